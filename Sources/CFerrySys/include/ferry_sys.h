#ifndef FERRY_SYS_H
#define FERRY_SYS_H
#include <stdint.h>

/// fallocate(2) with the given mode; returns 0 or -1 with errno set.
int ferry_fallocate(int fd, int mode, int64_t offset, int64_t length);
/// Deallocates [offset, offset+length) keeping the file size (FALLOC_FL_PUNCH_HOLE|KEEP_SIZE).
int ferry_punch_hole(int fd, int64_t offset, int64_t length);
/// Zeroes [offset, offset+length) keeping the size and allocation (FALLOC_FL_ZERO_RANGE|KEEP_SIZE).
int ferry_zero_range(int fd, int64_t offset, int64_t length);
/// lseek(fd, offset, SEEK_DATA); -1 with errno ENXIO when no data follows.
int64_t ferry_seek_data(int fd, int64_t offset);
/// lseek(fd, offset, SEEK_HOLE).
int64_t ferry_seek_hole(int fd, int64_t offset);
/// syncfs(2): commits the filesystem holding fd.
int ferry_syncfs(int fd);
/// sync_file_range flags are not needed; fdatasync is in Glibc.
/// Makes stdout line-buffered, so each line reaches a pipe as it is printed.
void ferry_stdout_line_buffered(void);

/// The commit the binary was built from (from ferry_commit.h, which make writes), or "unknown".
const char *ferry_build_commit(void);

#endif
