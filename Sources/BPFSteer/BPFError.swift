#if canImport(Glibc)
import Glibc
#endif

/// A failed libbpf or kernel call: what l4lb was doing, and the errno.
public struct BPFError: Error, CustomStringConvertible, Sendable {
    public let operation: String
    public let code: Int32

    init(_ operation: String, code: Int32) {
        self.operation = operation
        self.code = code < 0 ? -code : code
    }

    /// True when the failure means "not allowed here" (no privilege, no BPF): the caller
    /// may fall back to user space rather than fail.
    public var isUnavailable: Bool {
        [EPERM, EACCES, ENOSYS, EOPNOTSUPP, ENOTSUP].contains(code)
    }

    public var description: String {
        "\(operation): \(String(cString: strerror(code)))"
    }
}
