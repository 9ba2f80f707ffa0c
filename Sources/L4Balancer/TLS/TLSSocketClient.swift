internal import COpenSSL

#if canImport(Glibc)
import Glibc
#endif

/// A TLS client on a connected non-blocking socket, for the health checker's probes of
/// clusters with `tls:` (the data path uses memory BIOs on the ring instead). Each call
/// does what the socket allows now and says what it waits for.
struct TLSSocketClient {
    enum Step: Equatable {
        case done
        case wantRead
        case wantWrite
        case closed
        case failed(String)
    }

    private let ssl: OpaquePointer

    init?(_ context: TLSClientContext, fd: Int32, endpoint: Int) {
        guard let ssl = context.connection(endpoint: endpoint, socket: fd) else { return nil }
        guard SSL_set_fd(ssl, fd) == 1 else {
            SSL_free(ssl)
            return nil
        }
        self.ssl = ssl
    }

    func free() { SSL_free(ssl) }

    func handshake() -> Step {
        step(SSL_do_handshake(ssl), "TLS handshake")
    }

    /// Bytes written (> 0), or what it waits for.
    func write(_ bytes: UnsafeRawBufferPointer) -> (Int, Step) {
        let n = SSL_write(ssl, bytes.baseAddress, Int32(bytes.count))
        return n > 0 ? (Int(n), .done) : (0, step(n, "TLS write"))
    }

    /// Bytes read (> 0), or what it waits for (`.closed`: close_notify or EOF).
    func read(_ buffer: UnsafeMutableRawBufferPointer) -> (Int, Step) {
        let n = SSL_read(ssl, buffer.baseAddress, Int32(buffer.count))
        return n > 0 ? (Int(n), .done) : (0, step(n, "TLS read"))
    }

    private func step(_ result: Int32, _ what: String) -> Step {
        if result == 1 { return .done }
        let error = SSL_get_error(ssl, result)
        switch error {
        case SSL_ERROR_WANT_READ: return .wantRead
        case SSL_ERROR_WANT_WRITE: return .wantWrite
        case SSL_ERROR_ZERO_RETURN: return .closed
        default:
            if let verify = COpenSSL_verify_failure(ssl) {
                ERR_clear_error()
                return .failed("\(what): certificate did not verify: \(String(cString: verify))")
            }
            let code = ERR_get_error()
            ERR_clear_error()
            if code == 0 { return error == SSL_ERROR_SYSCALL ? .closed : .failed("\(what) failed") }
            var text = [CChar](repeating: 0, count: 256)
            ERR_error_string_n(code, &text, text.count)
            return .failed("\(what): \(text.withUnsafeBufferPointer { String(cString: $0.baseAddress!) })")
        }
    }
}
