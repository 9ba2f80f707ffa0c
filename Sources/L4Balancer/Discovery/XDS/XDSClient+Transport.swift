import Foundation
import GRPCNIOTransportHTTP2Posix
import NIOPosix

/// The gRPC channel to the management server: plain HTTP/2, or TLS (mTLS with a client
/// certificate) from `xds.tls`.
extension XDSClient {
    func transport() throws -> HTTP2ClientTransport.Posix {
        let target: any ResolvableTarget
        switch SocketAddress.parseIP(settings.host)?.count {
        case 4?: target = .ipv4(address: settings.host, port: settings.port)
        case 16?: target = .ipv6(address: settings.host, port: settings.port)
        default: target = .dns(host: settings.host, port: settings.port)
        }
        var config = HTTP2ClientTransport.Posix.Config.defaults
        config.connection.keepalive = .init(time: .seconds(30), timeout: .seconds(10), allowWithoutCalls: true)
        let security: HTTP2ClientTransport.Posix.TransportSecurity
        if let tls = settings.tls {
            if let name = tls.serverName { config.http2.authority = name }
            security = .tls { config in
                if let ca = tls.ca { config.trustRoots = .certificates([.file(path: ca, format: .pem)]) }
                if let cert = tls.cert, let key = tls.key {
                    config.certificateChain = [.file(path: cert, format: .pem)]
                    config.privateKey = .file(path: key, format: .pem)
                }
            }
        } else {
            security = .plaintext
        }
        // The stream's own event loop at the control thread's priority (as the admin API's).
        return try HTTP2ClientTransport.Posix(target: target, transportSecurity: security, config: config, eventLoopGroup: Self.eventLoopGroup)
    }
}
