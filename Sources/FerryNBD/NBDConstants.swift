/// Constants of the NBD protocol, as doc/proto.md of NetworkBlockDevice/nbd defines them
/// (research/block-replication.md §3.7). All integers on the wire are big-endian.
enum NBD {
    static let nbdMagic: UInt64 = 0x4e42_444d_4147_4943          // "NBDMAGIC"
    static let ihaveopt: UInt64 = 0x4948_4156_454F_5054          // "IHAVEOPT"
    static let optionReplyMagic: UInt64 = 0x0003_e889_0455_65a9
    static let requestMagic: UInt32 = 0x2560_9513
    static let simpleReplyMagic: UInt32 = 0x6744_6698
    static let structuredReplyMagic: UInt32 = 0x668e_33ef

    enum HandshakeFlag {
        static let fixedNewstyle: UInt16 = 0x1
        static let noZeroes: UInt16 = 0x2
    }

    enum ClientFlag {
        static let fixedNewstyle: UInt32 = 0x1
        static let noZeroes: UInt32 = 0x2
        static let known: UInt32 = fixedNewstyle | noZeroes
    }

    enum TransmissionFlag {
        static let hasFlags: UInt16 = 0x1
        static let readOnly: UInt16 = 0x2
        static let sendFlush: UInt16 = 0x4
        static let sendFUA: UInt16 = 0x8
        static let sendTrim: UInt16 = 0x20
        static let sendWriteZeroes: UInt16 = 0x40
        static let sendDF: UInt16 = 0x80
        static let canMultiConn: UInt16 = 0x100
        static let sendCache: UInt16 = 0x400
        static let sendFastZero: UInt16 = 0x800
    }

    enum Option {
        static let exportName: UInt32 = 1
        static let abort: UInt32 = 2
        static let list: UInt32 = 3
        static let startTLS: UInt32 = 5
        static let info: UInt32 = 6
        static let go: UInt32 = 7
        static let structuredReply: UInt32 = 8
        static let listMetaContext: UInt32 = 9
        static let setMetaContext: UInt32 = 10
    }

    enum Reply {
        static let ack: UInt32 = 1
        static let server: UInt32 = 2
        static let info: UInt32 = 3
        static let metaContext: UInt32 = 4
        static let errUnsup: UInt32 = 0x8000_0001
        static let errPolicy: UInt32 = 0x8000_0002
        static let errInvalid: UInt32 = 0x8000_0003
        static let errPlatform: UInt32 = 0x8000_0004
        static let errTLSRequired: UInt32 = 0x8000_0005
        static let errUnknown: UInt32 = 0x8000_0006
        static let errShutdown: UInt32 = 0x8000_0007
        static let errBlockSizeRequired: UInt32 = 0x8000_0008
        static let errTooBig: UInt32 = 0x8000_0009
    }

    enum Info {
        static let export: UInt16 = 0
        static let name: UInt16 = 1
        static let description: UInt16 = 2
        static let blockSize: UInt16 = 3
    }

    enum Command {
        static let read: UInt16 = 0
        static let write: UInt16 = 1
        static let disconnect: UInt16 = 2
        static let flush: UInt16 = 3
        static let trim: UInt16 = 4
        static let cache: UInt16 = 5
        static let writeZeroes: UInt16 = 6
        static let blockStatus: UInt16 = 7
    }

    enum CommandFlag {
        static let fua: UInt16 = 0x1
        static let noHole: UInt16 = 0x2
        static let df: UInt16 = 0x4
        static let reqOne: UInt16 = 0x8
        static let fastZero: UInt16 = 0x10
    }

    enum ChunkType {
        static let none: UInt16 = 0
        static let offsetData: UInt16 = 1
        static let offsetHole: UInt16 = 2
        static let blockStatus: UInt16 = 5
        static let error: UInt16 = 0x8001
        static let errorOffset: UInt16 = 0x8002
    }

    static let replyFlagDone: UInt16 = 0x1

    enum StateFlag {
        static let hole: UInt32 = 0x1
        static let zero: UInt32 = 0x2
    }

    enum Errno {
        static let eperm: UInt32 = 1
        static let eio: UInt32 = 5
        static let enomem: UInt32 = 12
        static let einval: UInt32 = 22
        static let enospc: UInt32 = 28
        static let eoverflow: UInt32 = 75
        static let enotsup: UInt32 = 95
        static let eshutdown: UInt32 = 108
    }

    /// The only meta context Ferry serves; its ID on this connection once selected.
    static let baseAllocation = "base:allocation"
    static let baseAllocationID: UInt32 = 1

    /// Bytes of option data we accept; more is a protocol abuse and closes the connection.
    static let maxOptionLength = 64 * 1024
    /// Request payloads up to 32 MiB must be consumed (proto.md: "SHOULD NOT be treated as DoS");
    /// we advertise exactly this as the maximum payload, and close on anything larger.
    static let maxPayload = 32 * 1024 * 1024
    /// Requests in flight on one connection before parsing pauses (backpressure).
    static let maxInFlight = 256
    /// WRITEs at least this large are written as their payload arrives, when the device can.
    static let streamingWriteThreshold: UInt32 = 128 * 1024
}
