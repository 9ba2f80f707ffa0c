import Foundation

/// Certificates for the TLS tests, made with the `openssl` command in a fresh directory:
/// a CA, server certificates for a.example.test (RSA, also *.a.example.test) and
/// b.example.test (ECDSA), a client certificate from the CA, and a CA and client
/// certificate nobody trusts.
final class TestPKI {
    let directory: URL

    init() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("l4lb-pki-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        try makeCA("ca", subject: "/CN=l4lb test CA")
        try makeCA("other-ca", subject: "/CN=untrusted CA")
        try issue("a", key: "rsa", subject: "/CN=a.example.test", names: ["a.example.test", "*.a.example.test"], by: "ca")
        try issue("b", key: "ec", subject: "/CN=b.example.test", names: ["b.example.test"], by: "ca")
        try issue("client", key: "ec", subject: "/CN=client-7/O=l4lb tests", names: [], by: "ca", client: true)
        try issue("stranger", key: "ec", subject: "/CN=stranger", names: [], by: "other-ca", client: true)
    }

    deinit { try? FileManager.default.removeItem(at: directory) }

    func path(_ name: String) -> String { directory.appendingPathComponent(name).path }

    /// Another certificate for a.example.test (a new key and serial), for reload tests.
    func reissueA(as name: String) throws {
        try issue(name, key: "ec", subject: "/CN=a.example.test", names: ["a.example.test"], by: "ca")
    }

    private func openssl(_ arguments: [String]) throws {
        let (status, output) = try ChildProcess.run("/usr/bin/openssl", arguments)
        guard status == 0 else { throw NSError(domain: "openssl", code: Int(status), userInfo: [NSLocalizedDescriptionKey: output]) }
    }

    private func keyArguments(_ kind: String) -> [String] {
        kind == "rsa" ? ["-newkey", "rsa:2048"] : ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    }

    private func makeCA(_ name: String, subject: String) throws {
        try openssl(["req", "-x509"] + keyArguments("ec") + [
            "-nodes", "-keyout", path("\(name).key"), "-out", path("\(name).pem"), "-days", "30", "-subj", subject,
        ])
    }

    private func issue(_ name: String, key: String, subject: String, names: [String], by ca: String, client: Bool = false) throws {
        try openssl(["req"] + keyArguments(key) + ["-nodes", "-keyout", path("\(name).key"), "-out", path("\(name).csr"), "-subj", subject])
        var extensions = client ? "extendedKeyUsage=clientAuth\n" : "extendedKeyUsage=serverAuth\n"
        if !names.isEmpty { extensions += "subjectAltName=" + names.map { "DNS:\($0)" }.joined(separator: ",") + "\n" }
        try extensions.write(toFile: path("\(name).ext"), atomically: true, encoding: .utf8)
        try openssl([
            "x509", "-req", "-in", path("\(name).csr"), "-CA", path("\(ca).pem"), "-CAkey", path("\(ca).key"),
            "-CAcreateserial", "-out", path("\(name).pem"), "-days", "30", "-extfile", path("\(name).ext"),
        ])
    }
}
