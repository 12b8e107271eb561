/// A failure starting or running a site, with a message a person can act on.
public struct SiteError: Error, CustomStringConvertible, Sendable {
    public var description: String
    public init(_ description: String) { self.description = description }
}
