internal import COpenSSL
import URing

#if canImport(Glibc)
import Glibc
#endif

/// The PROXY v2 header with the TLS TLVs (version, cipher, SNI, client certificate).
extension Worker {
    /// Writes and sends the PROXY v2 header, or tries again at the tick when no buffer is
    /// free (the connection waits in `.sendingProxyHeader`, nothing in flight).
    func startTLSProxyHeader(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) {
        guard let length = writeTLSProxyHeader(slot, record) else {
            side.tls[Int(slot)].headerUnwritten = true
            buffers.retriesAtTick.append((slot: slot, generation: record.pointee.generation))
            return
        }
        side.tls[Int(slot)].headerUnwritten = false
        record.pointee.toUpstream.length = length
        record.pointee.toUpstream.sent = 0
        sendProxyHeader(slot, record)
    }

    /// Writes the PROXY v2 header with the TLS TLVs (ALPN, SNI as authority, and the SSL
    /// TLV: version, cipher and, under mTLS, the verified client's common name) into a
    /// small buffer taken for it; returns its length, or nil when no buffer is free.
    func writeTLSProxyHeader(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) -> Int32? {
        let t = side.tls + Int(slot)
        guard let buffer = buffers.small.take() else { return nil }
        t.pointee.headerBuffer = buffer
        let out = bufferAddress(buffer, large: false)
        var length = ProxyProtocolHeader.write(version: .v2, client: record.pointee.client, into: out)
        // A LOCAL header (addresses unknown) carries no TLVs.
        guard length > 16 else { return Int32(length) }
        let ssl = t.pointee.ssl
        func tlv(_ type: UInt8, _ bytes: UnsafeRawPointer?, _ count: Int) {
            guard let bytes, count > 0, count <= 1024 else { return }
            out.storeBytes(of: type, toByteOffset: length, as: UInt8.self)
            out.storeBytes(of: UInt16(count).bigEndian, toByteOffset: length + 1, as: UInt16.self)
            (out + length + 3).copyMemory(from: bytes, byteCount: count)
            length += 3 + count
        }
        var alpn: UnsafePointer<UInt8>?
        var alpnLength: UInt32 = 0
        SSL_get0_alpn_selected(ssl, &alpn, &alpnLength)
        tlv(0x01, alpn, Int(alpnLength))  // PP2_TYPE_ALPN
        if let name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name) {
            tlv(0x02, name, strlen(name))  // PP2_TYPE_AUTHORITY
        }
        // PP2_TYPE_SSL: client flags, verify result, then sub-TLVs.
        let sslStart = length
        out.storeBytes(of: UInt8(0x20), toByteOffset: length, as: UInt8.self)
        length += 3
        let hasCertificate = COpenSSL_has_peer_certificate(ssl) == 1
        let verified = hasCertificate && SSL_get_verify_result(ssl) == X509_V_OK
        // PP2_CLIENT_SSL, PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS when a certificate came.
        out.storeBytes(of: UInt8(hasCertificate ? 0x07 : 0x01), toByteOffset: length, as: UInt8.self)
        out.storeBytes(of: UInt32(verified || !hasCertificate ? 0 : 1).bigEndian, toByteOffset: length + 1, as: UInt32.self)
        length += 5
        if let version = SSL_get_version(ssl) { tlv(0x21, version, strlen(version)) }  // PP2_SUBTYPE_SSL_VERSION
        if let cipher = SSL_CIPHER_get_name(SSL_get_current_cipher(ssl)) { tlv(0x23, cipher, strlen(cipher)) }  // PP2_SUBTYPE_SSL_CIPHER
        if verified {
            var name = [CChar](repeating: 0, count: 256)
            let count = COpenSSL_peer_common_name(ssl, &name, Int32(name.count))
            name.withUnsafeBytes { tlv(0x22, $0.baseAddress, Int(count)) }  // PP2_SUBTYPE_SSL_CN
        }
        out.storeBytes(of: UInt16(length - sslStart - 3).bigEndian, toByteOffset: sslStart + 1, as: UInt16.self)
        out.storeBytes(of: UInt16(length - 16).bigEndian, toByteOffset: 14, as: UInt16.self)
        return Int32(length)
    }
}
