/// A TCP address as written in configuration: `10.0.0.2:7800`, `east.example.net:7800`,
/// `[::1]:7800`.
///
/// The host is kept as written (a name is resolved when a connection is made, not when the file is
/// read, so that a peer whose DNS name is briefly unresolvable does not stop this site from
/// starting). IPv6 literals are stored without their brackets and printed with them.
public struct HostPort: Sendable, Hashable, CustomStringConvertible {
    /// A host name, an IPv4 literal, or an IPv6 literal without brackets (`::1`, `fe80::1%eth0`).
    public var host: String
    /// 0...65535; 0 asks the system for a free port and is accepted only for listen addresses.
    public var port: Int

    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    /// Why a text is not a `host:port`; `reason` says what to write instead.
    public struct ParseError: Error, Sendable, Equatable, CustomStringConvertible {
        public var text: String
        public var reason: String
        public var description: String { "\"\(text)\" is not a host:port; \(reason)" }
    }

    /// Parses `host:port` or `[ipv6]:port`.
    ///
    /// - Parameter allowingPortZero: true for addresses this site listens on (port 0 means "any
    ///   free port", useful in tests); false for addresses to connect to.
    public init(parsing text: String, allowingPortZero: Bool = true) throws(ParseError) {
        func fail(_ reason: String) -> ParseError { ParseError(text: text, reason: reason) }
        let example = "write host:port, e.g. 10.0.0.2:7800 or [::1]:7800"

        let host: Substring
        let portText: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else {
                throw fail("the IPv6 address has no closing \"]\"; \(example)")
            }
            host = text[text.index(after: text.startIndex)..<close]
            let rest = text[text.index(after: close)...]
            guard rest.first == ":" else { throw fail("the port is missing after \"]\"; \(example)") }
            portText = rest.dropFirst()
            guard host.contains(":"), host.allSatisfy(Self.isIPv6Character) else {
                throw fail("\"\(host)\" in brackets is not an IPv6 address; \(example)")
            }
        } else {
            let colons = text.filter { $0 == ":" }.count
            if colons == 0 { throw fail("the port is missing; \(example)") }
            if colons > 1 { throw fail("put an IPv6 address in brackets, e.g. [::1]:7800") }
            let colon = text.firstIndex(of: ":")!
            host = text[..<colon]
            portText = text[text.index(after: colon)...]
            guard !host.isEmpty else {
                throw fail("the host is missing; use 0.0.0.0 to listen on every address, e.g. 0.0.0.0:7800")
            }
            guard host.allSatisfy(Self.isHostNameCharacter) else {
                throw fail("\"\(host)\" is not a host name or IP address; \(example)")
            }
        }
        guard !portText.isEmpty else { throw fail("the port is missing; \(example)") }
        guard portText.allSatisfy({ $0.isASCII && $0.isNumber }), portText.count <= 5,
              let port = Int(portText), port <= 65535 else {
            throw fail("\"\(portText)\" is not a port; use a number from 1 to 65535")
        }
        if port == 0 && !allowingPortZero {
            throw fail("port 0 only makes sense for listening; use the port the other side listens on, e.g. 7800")
        }
        self.host = String(host)
        self.port = port
    }

    /// Parses like ``init(parsing:allowingPortZero:)`` with port 0 allowed; nil when invalid.
    public init?(_ text: String) {
        guard let parsed = try? HostPort(parsing: text) else { return nil }
        self = parsed
    }

    /// `host:port`, with brackets around an IPv6 host; parses back to an equal value.
    public var description: String {
        host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
    }

    /// True for the any-address hosts (`0.0.0.0`, `::`) that a listener binds on every interface.
    public var isWildcard: Bool {
        host == "0.0.0.0" || host == "::" || host == "0:0:0:0:0:0:0:0"
    }

    /// True for loopback hosts (`127.0.0.0/8`, `::1`, `localhost`): reachable from this machine only.
    public var isLoopback: Bool {
        let h = host.lowercased()
        return h == "localhost" || h == "::1" || h == "0:0:0:0:0:0:0:1" || h.hasPrefix("127.")
    }

    /// Whether two listeners would collide: the same port on the same host, or on any host when
    /// one of them binds the wildcard address. Port 0 is a fresh port each time, so never collides.
    func collides(with other: HostPort) -> Bool {
        guard port == other.port, port != 0 else { return false }
        return host.lowercased() == other.host.lowercased() || isWildcard || other.isWildcard
    }

    private static func isHostNameCharacter(_ c: Character) -> Bool {
        c.isASCII && (c.isLetter || c.isNumber || c == "." || c == "-" || c == "_")
    }

    private static func isIPv6Character(_ c: Character) -> Bool {
        // Hex digits, colons, an embedded IPv4 tail, and a zone after `%` (`fe80::1%eth0`).
        c.isASCII && (c.isLetter || c.isNumber || c == ":" || c == "." || c == "%")
    }
}
