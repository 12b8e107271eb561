import CoreMetrics
import NIOCore

/// What one connection records per request when the site serves metrics (`listen.metrics`):
/// requests, bytes and latency by command, errors by command and errno. The handlers are made
/// once per connection when it attaches to an export (the backend hands every connection of an
/// export the same series), so a request costs two atomic increments and one histogram update.
final class NBDRequestMetrics {
    /// The metric names: a contract with dashboards and `deploy/prometheus/ferry-rules.yml`.
    static let requests = "ferry_nbd_requests_total"
    static let bytes = "ferry_nbd_request_bytes_total"
    static let duration = "ferry_nbd_request_duration_seconds"
    static let errors = "ferry_nbd_errors_total"

    private struct Op {
        let name: String
        let requests: Counter
        let bytes: Counter
        let duration: Timer
    }

    let volume: String
    /// Indexed by NBD command number; the last entry is for commands Ferry does not know.
    private let ops: [Op]

    init(volume: String) {
        self.volume = volume
        self.ops = Self.opNames.map { name in
            let dims = [("volume", volume), ("op", name)]
            return Op(name: name, requests: Counter(label: Self.requests, dimensions: dims),
                      bytes: Counter(label: Self.bytes, dimensions: dims),
                      duration: Timer(label: Self.duration, dimensions: dims))
        }
    }

    /// By command number (proto.md); `disconnect` never gets a reply so is never recorded.
    static let opNames = ["read", "write", "disconnect", "flush", "trim", "cache", "write_zeroes", "block_status", "other"]

    static func now() -> UInt64 { NIODeadline.now().uptimeNanoseconds }

    func record(type: UInt16, length: UInt32, started: UInt64, error: UInt32) {
        let op = ops[min(Int(type), ops.count - 1)]
        op.requests.increment()
        if error == 0 {
            if type == NBD.Command.read || type == NBD.Command.write { op.bytes.increment(by: Int64(length)) }
        } else {
            Counter(label: Self.errors, dimensions: [("volume", volume), ("op", op.name), ("code", Self.errnoName(error))]).increment()
        }
        if started != 0 {
            let elapsed = Self.now() &- started
            op.duration.recordNanoseconds(Int64(truncatingIfNeeded: elapsed))
        }
    }

    static func errnoName(_ code: UInt32) -> String {
        switch code {
        case NBD.Errno.eperm: return "EPERM"
        case NBD.Errno.eio: return "EIO"
        case NBD.Errno.enomem: return "ENOMEM"
        case NBD.Errno.einval: return "EINVAL"
        case NBD.Errno.enospc: return "ENOSPC"
        case NBD.Errno.eoverflow: return "EOVERFLOW"
        case NBD.Errno.enotsup: return "ENOTSUP"
        case NBD.Errno.eshutdown: return "ESHUTDOWN"
        default: return "OTHER"
        }
    }
}
