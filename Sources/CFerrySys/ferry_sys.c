// _GNU_SOURCE here, not in the header: the header is imported through Swift's Glibc module,
// which is built without it (research/swift-platform.md §4).
#define _GNU_SOURCE 1
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
#include <linux/falloc.h>
#include "ferry_sys.h"

int ferry_fallocate(int fd, int mode, int64_t offset, int64_t length) {
    return fallocate(fd, mode, (off_t)offset, (off_t)length);
}

int ferry_punch_hole(int fd, int64_t offset, int64_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length);
}

int ferry_zero_range(int fd, int64_t offset, int64_t length) {
    return fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length);
}

int64_t ferry_seek_data(int fd, int64_t offset) {
    return (int64_t)lseek(fd, (off_t)offset, SEEK_DATA);
}

int64_t ferry_seek_hole(int fd, int64_t offset) {
    return (int64_t)lseek(fd, (off_t)offset, SEEK_HOLE);
}

int ferry_syncfs(int fd) { return syncfs(fd); }

void ferry_stdout_line_buffered(void) { setvbuf(stdout, NULL, _IOLBF, 0); }

/* `make` writes ferry_commit.h (not in git) with the commit it builds. */
#if __has_include("ferry_commit.h")
#include "ferry_commit.h"
#endif
#ifndef FERRY_COMMIT
#define FERRY_COMMIT "unknown"
#endif

const char *ferry_build_commit(void) { return FERRY_COMMIT; }
