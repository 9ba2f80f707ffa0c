import COpenSSL
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A blocking TLS client for the tests (OpenSSL on a socket with timeouts): handshake
/// with the options a test needs, then exact sends and receives.
final class TLSClient {
    struct Failure: Error, CustomStringConvertible {
        let description: String
    }

    struct Options {
        var serverName: String?
        var caFile: String?
        var certFile: String?
        var keyFile: String?
        var maxVersion: Int32 = 0
        var alpn: [String] = []
        var session: OpaquePointer?
    }

    let fd: Int32
    private let context: OpaquePointer
    private let ssl: OpaquePointer

    init(port: UInt16, host: String = "127.0.0.1", _ options: Options, timeout: TimeInterval = 10) throws {
        fd = try Sockets.connect(host: host, port: port, timeout: timeout)
        Sockets.setTimeout(fd, seconds: timeout)
        context = SSL_CTX_new(TLS_client_method())!
        ssl = SSL_new(context)!
        if let caFile = options.caFile {
            SSL_CTX_load_verify_locations(context, caFile, nil)
            SSL_set_verify(ssl, SSL_VERIFY_PEER, nil)
        }
        if let certFile = options.certFile, let keyFile = options.keyFile {
            SSL_use_certificate_file(ssl, certFile, SSL_FILETYPE_PEM)
            SSL_use_PrivateKey_file(ssl, keyFile, SSL_FILETYPE_PEM)
        }
        if options.maxVersion != 0 { COpenSSL_set_max_proto_version(ssl, options.maxVersion) }
        if let name = options.serverName { _ = COpenSSL_set_tlsext_host_name(ssl, name) }
        if !options.alpn.isEmpty {
            let wire = options.alpn.flatMap { [UInt8($0.utf8.count)] + Array($0.utf8) }
            SSL_set_alpn_protos(ssl, wire, UInt32(wire.count))
        }
        if let session = options.session { SSL_set_session(ssl, session) }
        SSL_set_fd(ssl, fd)
        guard SSL_connect(ssl) == 1 else {
            let message = TLSClient.errorText()
            SSL_free(ssl)
            SSL_CTX_free(context)
            close(fd)
            throw Failure(description: "handshake failed: \(message)")
        }
    }

    deinit {
        SSL_free(ssl)
        SSL_CTX_free(context)
        close(fd)
    }

    var version: String { String(cString: SSL_get_version(ssl)) }
    var resumed: Bool { SSL_session_reused(ssl) == 1 }
    var peerCommonName: String? {
        guard let peer = SSL_get0_peer_certificate(ssl) else { return nil }
        var name = [CChar](repeating: 0, count: 256)
        let n = X509_NAME_get_text_by_NID(X509_get_subject_name(peer), NID_commonName, &name, 256)
        return n > 0 ? String(decoding: name.prefix(Int(n)).map { UInt8(bitPattern: $0) }, as: UTF8.self) : nil
    }
    /// The server certificate's serial number, in hex.
    var peerSerial: String? {
        guard let peer = SSL_get0_peer_certificate(ssl), let number = ASN1_INTEGER_to_BN(X509_get0_serialNumber(peer), nil) else { return nil }
        defer { BN_free(number) }
        guard let hex = BN_bn2hex(number) else { return nil }
        defer { CRYPTO_free(hex, #file, #line) }
        return String(cString: hex)
    }
    var selectedALPN: String? {
        var data: UnsafePointer<UInt8>?
        var length: UInt32 = 0
        SSL_get0_alpn_selected(ssl, &data, &length)
        guard let data, length > 0 else { return nil }
        return String(decoding: UnsafeBufferPointer(start: data, count: Int(length)), as: UTF8.self)
    }
    /// The session to resume with (the caller frees it with `SSL_SESSION_free`).
    var session: OpaquePointer? { SSL_get1_session(ssl) }

    func send(_ bytes: [UInt8]) throws {
        var offset = 0
        while offset < bytes.count {
            let n = bytes[offset...].withUnsafeBytes { SSL_write(ssl, $0.baseAddress, Int32($0.count)) }
            guard n > 0 else { throw Failure(description: "write failed: \(TLSClient.errorText())") }
            offset += Int(n)
        }
    }

    func receive(_ count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        var offset = 0
        while offset < count {
            let n = out[offset...].withUnsafeMutableBytes { SSL_read(ssl, $0.baseAddress, Int32($0.count)) }
            guard n > 0 else { throw Failure(description: "read failed after \(offset) of \(count) bytes: \(TLSClient.errorText())") }
            offset += Int(n)
        }
        return out
    }

    /// Reads once (a TLS record or part of one); empty at close_notify or EOF.
    func receiveSome() -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 16_384)
        let n = out.withUnsafeMutableBytes { SSL_read(ssl, $0.baseAddress, 16_384) }
        return n > 0 ? Array(out.prefix(Int(n))) : []
    }

    /// OpenSSL's last error, as text.
    static func errorText() -> String {
        let code = ERR_get_error()
        ERR_clear_error()
        guard code != 0 else { return "connection closed" }
        var text = [CChar](repeating: 0, count: 256)
        ERR_error_string_n(code, &text, 256)
        return String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
