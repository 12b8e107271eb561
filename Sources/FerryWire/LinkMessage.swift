import FerryCore
import NIOCore

/// The link-control messages, each carried in one ``Frame`` of its own type.
///
/// Payload layouts are in the ``Frame`` documentation. Decoding is strict: a payload with missing
/// or extra bytes throws ``FrameError/malformedPayload(_:_:)``.
public enum LinkMessage: Sendable, Equatable {
    /// Opens a link (``FrameType/hello``).
    case hello(Hello)
    /// Accepts a link at the chosen protocol version (``FrameType/helloAck``).
    case helloAck(version: UInt16)
    /// Heartbeat (``FrameType/ping``); `sentAt` is the sender's monotonic clock in nanoseconds.
    case ping(nonce: UInt64, sentAt: UInt64)
    /// Heartbeat answer (``FrameType/pong``), echoing the ping's fields.
    case pong(nonce: UInt64, sentAt: UInt64)
    /// Sent before a deliberate close (``FrameType/goodbye``).
    case goodbye(reason: String)

    /// The contents of a `hello`.
    public struct Hello: Sendable, Equatable {
        /// The link protocol versions the sender speaks.
        public var versions: ClosedRange<UInt16>
        /// The sender's site name (informational; peers are named by local configuration).
        public var siteName: String
        /// The sender's site ID; must equal the fingerprint of the certificate it presented.
        public var siteID: SiteID

        public init(versions: ClosedRange<UInt16>, siteName: String, siteID: SiteID) {
            self.versions = versions
            self.siteName = siteName
            self.siteID = siteID
        }
    }

    /// The longest string a message carries, in UTF-8 bytes; longer ones are cut when encoding.
    public static let maxStringBytes = 1024

    /// Parses a link-control frame. Throws ``FrameError/unknownType(_:)`` for any other type.
    public init(frame: Frame) throws {
        var payload = frame.payload
        let type = frame.type
        switch type {
        case .hello:
            let min = try Self.read(UInt16.self, from: &payload, type)
            let max = try Self.read(UInt16.self, from: &payload, type)
            guard min <= max else {
                throw FrameError.malformedPayload(type, "version range \(min)...\(max) is empty")
            }
            guard let idBytes = payload.readBytes(length: 32), let id = SiteID(bytes: idBytes) else {
                throw FrameError.malformedPayload(type, "payload ends inside the site ID")
            }
            let name = try Self.readString(from: &payload, type)
            self = .hello(Hello(versions: min...max, siteName: name, siteID: id))
        case .helloAck:
            self = .helloAck(version: try Self.read(UInt16.self, from: &payload, type))
        case .ping:
            let nonce = try Self.read(UInt64.self, from: &payload, type)
            self = .ping(nonce: nonce, sentAt: try Self.read(UInt64.self, from: &payload, type))
        case .pong:
            let nonce = try Self.read(UInt64.self, from: &payload, type)
            self = .pong(nonce: nonce, sentAt: try Self.read(UInt64.self, from: &payload, type))
        case .goodbye:
            self = .goodbye(reason: try Self.readString(from: &payload, type))
        default:
            throw FrameError.unknownType(type)
        }
        guard payload.readableBytes == 0 else {
            throw FrameError.malformedPayload(type, "\(payload.readableBytes) unexpected bytes after the fields")
        }
    }

    /// The message as the peer-link state machines see it (`hello`'s site name is dropped).
    public var control: LinkControlMessage {
        switch self {
        case .hello(let hello): return .hello(versions: hello.versions, siteID: hello.siteID)
        case .helloAck(let version): return .helloAck(version: version)
        case .ping(let nonce, let sentAt): return .ping(nonce: nonce, sentAt: sentAt)
        case .pong(let nonce, let sentAt): return .pong(nonce: nonce, sentAt: sentAt)
        case .goodbye(let reason): return .goodbye(reason: reason)
        }
    }

    /// A state machine's message on the wire; `siteName` goes into a `hello`.
    public init(_ control: LinkControlMessage, siteName: String) {
        switch control {
        case .hello(let versions, let siteID):
            self = .hello(Hello(versions: versions, siteName: siteName, siteID: siteID))
        case .helloAck(let version): self = .helloAck(version: version)
        case .ping(let nonce, let sentAt): self = .ping(nonce: nonce, sentAt: sentAt)
        case .pong(let nonce, let sentAt): self = .pong(nonce: nonce, sentAt: sentAt)
        case .goodbye(let reason): self = .goodbye(reason: reason)
        }
    }

    /// This message as a frame.
    public func frame(allocator: ByteBufferAllocator = ByteBufferAllocator()) -> Frame {
        var payload = allocator.buffer(capacity: 64)
        let type: FrameType
        switch self {
        case .hello(let hello):
            type = .hello
            payload.writeInteger(hello.versions.lowerBound)
            payload.writeInteger(hello.versions.upperBound)
            payload.writeBytes(hello.siteID.bytes)
            Self.writeString(hello.siteName, to: &payload)
        case .helloAck(let version):
            type = .helloAck
            payload.writeInteger(version)
        case .ping(let nonce, let sentAt):
            type = .ping
            payload.writeInteger(nonce)
            payload.writeInteger(sentAt)
        case .pong(let nonce, let sentAt):
            type = .pong
            payload.writeInteger(nonce)
            payload.writeInteger(sentAt)
        case .goodbye(let reason):
            type = .goodbye
            Self.writeString(reason, to: &payload)
        }
        return Frame(type: type, payload: payload)
    }

    static func read<T: FixedWidthInteger>(_: T.Type, from buffer: inout ByteBuffer, _ type: FrameType) throws -> T {
        guard let value = buffer.readInteger(as: T.self) else {
            throw FrameError.malformedPayload(type, "payload is too short")
        }
        return value
    }

    static func readString(from buffer: inout ByteBuffer, _ type: FrameType) throws -> String {
        let length = try read(UInt16.self, from: &buffer, type)
        guard let bytes = buffer.readBytes(length: Int(length)) else {
            throw FrameError.malformedPayload(type, "string of \(length) bytes runs past the payload")
        }
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw FrameError.malformedPayload(type, "string is not valid UTF-8")
        }
        return text
    }

    static func writeString(_ text: String, to buffer: inout ByteBuffer) {
        var bytes = Array(text.utf8)
        if bytes.count > maxStringBytes {
            bytes = Array(bytes.prefix(maxStringBytes))
            // Do not leave half a character: drop continuation bytes at the cut.
            while let last = bytes.last, last & 0xC0 == 0x80 { bytes.removeLast() }
            if let last = bytes.last, last >= 0xC0 { bytes.removeLast() }
        }
        buffer.writeInteger(UInt16(bytes.count))
        buffer.writeBytes(bytes)
    }
}

/// Link protocol version negotiation (proto: "the highest version both ranges contain").
public enum LinkVersion {
    /// The link protocol versions this build speaks.
    public static let supported: ClosedRange<UInt16> = 1...1

    /// The highest version in both ranges, or nil when they do not overlap.
    public static func negotiate(_ local: ClosedRange<UInt16>, _ remote: ClosedRange<UInt16>) -> UInt16? {
        PeerConnectionMachine.negotiate(local, remote)
    }
}
