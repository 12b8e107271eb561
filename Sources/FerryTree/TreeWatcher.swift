import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Watches a tree with inotify (one watch per directory) and calls `changed` after a burst of
/// events has settled: `quiet` after the last event, or at most `maxDelay` after the first.
///
/// A directory created or moved in is watched at once (its contents then come with the next scan,
/// which re-reads everything the files cache cannot vouch for). A queue overflow or a failed
/// watch is never a missed change: the scan after it covers the whole tree. When the watch limit
/// is reached (`fs.inotify.max_user_watches`), the watcher says so once and falls back to a rescan
/// every `fallbackInterval`.
public final class TreeWatcher: @unchecked Sendable {
    public let root: String
    let quiet: Double
    let maxDelay: Double
    let fallbackInterval: Double
    private let changed: @Sendable () -> Void
    private let problem: @Sendable (String) -> Void
    private var fd: Int32 = -1
    private var watches: [Int32: [UInt8]] = [:]
    private var limitReached = false
    private let stopped = Mutex(false)
    private var thread: Thread?

    public init(root: String, quiet: Double = 0.05, maxDelay: Double = 0.25, fallbackInterval: Double = 10,
                changed: @escaping @Sendable () -> Void, problem: @escaping @Sendable (String) -> Void) {
        self.root = root
        self.quiet = quiet
        self.maxDelay = maxDelay
        self.fallbackInterval = fallbackInterval
        self.changed = changed
        self.problem = problem
    }

    static let mask: UInt32 = UInt32(IN_CREATE | IN_MODIFY | IN_CLOSE_WRITE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO
                                     | IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF) | 0x0100_0000 /* IN_ONLYDIR */

    public func start() {
        fd = inotify_init1(Int32(IN_CLOEXEC | IN_NONBLOCK))
        if fd < 0 {
            problem("inotify is unavailable (\(String(cString: strerror(errno)))); rescanning every \(Int(fallbackInterval)) s instead")
            limitReached = true
        } else {
            addTree(resolvedRoot, relative: [])
        }
        let thread = Thread { [self] in loop() }
        thread.name = "ferry-watch"
        self.thread = thread
        thread.start()
    }

    public func stop() {
        stopped.withLock { $0 = true }
        while thread?.isFinished == false { usleep(10_000) }
        if fd >= 0 { close(fd); fd = -1 }
    }

    /// Watches `path` and every directory under it (not following symlinks or crossing mounts).
    private func addTree(_ absolute: [UInt8], relative: [UInt8]) {
        guard !limitReached else { return }
        let wd = PosixFS.withCName(absolute) { inotify_add_watch(fd, $0, Self.mask | UInt32(0x0200_0000) /* IN_DONT_FOLLOW */) }
        if wd < 0 {
            if errno == ENOSPC {
                limitReached = true
                problem("the inotify watch limit is reached (fs.inotify.max_user_watches); raise it with "
                        + "sysctl fs.inotify.max_user_watches=524288. Until then the tree is rescanned every \(Int(fallbackInterval)) s")
            }
            return
        }
        watches[wd] = relative
        let dir = PosixFS.withCName(absolute) { open($0, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) }
        guard dir >= 0 else { return }
        defer { close(dir) }
        for name in PosixFS.names(in: dir) ?? [] {
            guard let st = PosixFS.lstat(at: dir, name), PosixFS.isDirectory(st) else { continue }
            addTree(absolute + [0x2F] + name, relative: TreePath.join(relative, name))
        }
    }

    private func loop() {
        var buffer = [UInt8](repeating: 0, count: 64 << 10)
        var firstEvent: Double?
        var lastEvent = 0.0
        var lastFallback = Self.now()
        while !stopped.withLock({ $0 }) {
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let timeout: Int32 = firstEvent == nil ? 200 : 10
            _ = fd >= 0 ? poll(&pfd, 1, timeout) : { usleep(200_000); return 0 }()
            let now = Self.now()
            if fd >= 0 && pfd.revents & Int16(POLLIN) != 0 {
                let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if n > 0 {
                    handle(buffer, count: n)
                    if firstEvent == nil { firstEvent = now }
                    lastEvent = now
                }
            }
            if let first = firstEvent, now - lastEvent >= quiet || now - first >= maxDelay {
                firstEvent = nil
                changed()
            }
            if limitReached && now - lastFallback >= fallbackInterval {
                lastFallback = now
                changed()
            }
        }
    }

    private var rewatch = false

    /// The root as a path to watch: a source given as a symlink is watched where it leads (the
    /// scan follows it too).
    private var resolvedRoot: [UInt8] {
        Array((realpath(root, nil).map { p -> String in defer { free(p) }; return String(cString: p) } ?? root).utf8)
    }

    private func handle(_ buffer: [UInt8], count: Int) {
        defer {
            if rewatch {
                rewatch = false
                watches.removeAll()
                addTree(resolvedRoot, relative: [])
            }
        }
        buffer.withUnsafeBytes { raw in
            var offset = 0
            while offset + MemoryLayout<inotify_event>.size <= count {
                let wd = raw.loadUnaligned(fromByteOffset: offset, as: Int32.self)
                let mask = raw.loadUnaligned(fromByteOffset: offset + 4, as: UInt32.self)
                let length = Int(raw.loadUnaligned(fromByteOffset: offset + 12, as: UInt32.self))
                let nameBytes = raw[(offset + 16)..<(offset + 16 + length)]
                let name = Array(nameBytes.prefix { $0 != 0 })
                offset += 16 + length
                if mask & UInt32(IN_Q_OVERFLOW) != 0 || (mask & UInt32(IN_ISDIR) != 0 && mask & UInt32(IN_MOVED_FROM | IN_MOVED_TO) != 0) {
                    // The next scan covers every file; the watches are laid again from the root so
                    // that directories made meanwhile, or moved (their paths changed), are watched.
                    rewatch = true
                    continue
                }
                if mask & UInt32(IN_IGNORED) != 0 { watches[wd] = nil; continue }
                if mask & UInt32(IN_ISDIR) != 0 && mask & UInt32(IN_CREATE | IN_MOVED_TO) != 0, let parent = watches[wd] {
                    let relative = TreePath.join(parent, name)
                    addTree(Array(root.utf8) + [0x2F] + relative, relative: relative)
                }
            }
        }
    }

    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}
