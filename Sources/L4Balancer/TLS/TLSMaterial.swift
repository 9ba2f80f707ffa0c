internal import COpenSSL
import Foundation

/// Reads and checks the PEM files a `tls:` block names, on the control plane: a file that
/// is missing, holds no certificate, a key that does not parse or does not match its
/// certificate, a bad CA or CRL — each is an error naming the file, so `check` and a
/// reload fail with the old config still running.
enum TLSMaterial {
    struct Failure: Error {
        let message: String
    }

    static func read(_ path: String) throws(Failure) -> [UInt8] {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw Failure(message: "\(path): cannot read file")
        }
        return [UInt8](data)
    }

    /// The certificate chain and key at these paths, checked to belong together.
    static func certificate(certPath: String, keyPath: String) throws(Failure) -> Config.TLS.Certificate {
        let chain = try read(certPath)
        let key = try read(keyPath)
        guard let leaf = firstCertificate(chain) else {
            throw Failure(message: "\(certPath): no PEM certificate (\(lastError()))")
        }
        defer { X509_free(leaf) }
        guard let privateKey = privateKey(key) else {
            let encrypted = String(decoding: key, as: UTF8.self).contains("ENCRYPTED")
            if encrypted { ERR_clear_error() }
            throw Failure(message: encrypted
                ? "\(keyPath): the key is encrypted; l4lb needs it unencrypted (openssl pkey -in KEY -out KEY.plain)"
                : "\(keyPath): no PEM private key (\(lastError()))")
        }
        defer { EVP_PKEY_free(privateKey) }
        guard X509_check_private_key(leaf, privateKey) == 1 else {
            ERR_clear_error()
            throw Failure(message: "\(keyPath): the key does not match the certificate in \(certPath)")
        }
        var names = [CChar](repeating: 0, count: 8192)
        let count = COpenSSL_certificate_names(leaf, &names, Int32(names.count))
        var found: [String] = []
        if count > 0 {
            var offset = 0
            for _ in 0..<count {
                let bytes = names[offset...].prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }
                offset += bytes.count + 1
                let name = String(decoding: bytes, as: UTF8.self)
                found.append(name)
            }
        }
        return Config.TLS.Certificate(
            certPath: certPath, keyPath: keyPath, chainPEM: chain, keyPEM: key, names: found,
            notAfter: Int64(COpenSSL_certificate_not_after(leaf)))
    }

    /// A CA bundle: at least one certificate, every block parsing.
    static func authorities(_ path: String) throws(Failure) -> [UInt8] {
        let pem = try read(path)
        let count = withBIO(pem) { bio -> Int in
            var n = 0
            while let cert = PEM_read_bio_X509(bio, nil, nil, nil) {
                X509_free(cert)
                n += 1
            }
            return n
        }
        ERR_clear_error()
        guard count > 0 else { throw Failure(message: "\(path): no PEM certificate") }
        return pem
    }

    static func revocations(_ path: String) throws(Failure) -> [UInt8] {
        let pem = try read(path)
        let ok = withBIO(pem) { bio -> Bool in
            guard let crl = PEM_read_bio_X509_CRL(bio, nil, nil, nil) else { return false }
            X509_CRL_free(crl)
            return true
        }
        guard ok else { throw Failure(message: "\(path): no PEM CRL (\(lastError()))") }
        return pem
    }

    // MARK: OpenSSL helpers (shared with TLSServerContext)

    static func withBIO<T>(_ bytes: [UInt8], _ body: (OpaquePointer) -> T) -> T {
        bytes.withUnsafeBytes { raw in
            let bio = BIO_new_mem_buf(raw.baseAddress, Int32(raw.count))!
            defer { BIO_free(bio) }
            return body(bio)
        }
    }

    static func firstCertificate(_ pem: [UInt8]) -> OpaquePointer? {
        withBIO(pem) { PEM_read_bio_X509($0, nil, nil, nil) }
    }

    static func privateKey(_ pem: [UInt8]) -> OpaquePointer? {
        withBIO(pem) { COpenSSL_read_private_key($0) }
    }

    /// OpenSSL's most recent error as text (the queue is cleared).
    static func lastError() -> String {
        let code = ERR_get_error()
        ERR_clear_error()
        guard code != 0 else { return "unknown error" }
        var text = [CChar](repeating: 0, count: 256)
        ERR_error_string_n(code, &text, text.count)
        return String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
