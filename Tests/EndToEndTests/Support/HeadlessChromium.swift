import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Debian's chromium, headless, driven over the DevTools protocol through
/// `--remote-debugging-pipe` (NUL-terminated JSON on descriptors 3 and 4: no WebSocket).
/// One page; `evaluate` runs JavaScript in it, `screenshot` captures it as PNG.
final class HeadlessChromium {
    private let process: ChildProcess
    private let commands: Int32   // we write, chromium reads (its fd 3)
    private let events: Int32     // chromium writes (its fd 4), we read
    private let profile: URL
    private var nextID = 0
    private var pending: [UInt8] = []
    private var session = ""

    static var executable: String? {
        ["/usr/bin/chromium", "/usr/bin/chromium-browser"].first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    init(width: Int = 1280, height: Int = 900) throws {
        guard let executable = HeadlessChromium.executable else { throw Sockets.Failure("chromium is not installed (scripts/bootstrap)", ENOENT) }
        var toChromium: [Int32] = [0, 0], fromChromium: [Int32] = [0, 0]
        guard pipe(&toChromium) == 0, pipe(&fromChromium) == 0 else { throw Sockets.Failure("pipe") }
        profile = FileManager.default.temporaryDirectory.appendingPathComponent("l4lb-chromium-\(UUID().uuidString)")
        process = try ChildProcess(executable, [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
            "--disable-background-networking", "--disable-sync", "--remote-debugging-pipe",
            "--user-data-dir=\(profile.path)", "--window-size=\(width),\(height)", "about:blank",
        ], descriptors: [(toChromium[0], 3), (fromChromium[1], 4)])
        close(toChromium[0])
        close(fromChromium[1])
        commands = toChromium[1]
        events = fromChromium[0]
        let target = try call("Target.createTarget", ["url": "about:blank"], inSession: false)
        let attached = try call("Target.attachToTarget", ["targetId": target["targetId"] ?? "", "flatten": true], inSession: false)
        session = attached["sessionId"] as? String ?? ""
        _ = try call("Emulation.setDeviceMetricsOverride", ["width": width, "height": height, "deviceScaleFactor": 1, "mobile": false])
        _ = try call("Page.enable", [:])
    }

    deinit {
        close(commands)
        close(events)
        process.signal(SIGKILL)
        process.wait()
        try? FileManager.default.removeItem(at: profile)
    }

    func navigate(_ url: String) throws {
        _ = try call("Page.navigate", ["url": url])
    }

    /// The value of a JavaScript expression (JSON-serialisable), or nil on an exception.
    func evaluate(_ expression: String) throws -> Any? {
        let result = try call("Runtime.evaluate", ["expression": expression, "returnByValue": true, "awaitPromise": true])
        guard result["exceptionDetails"] == nil else { return nil }
        return (result["result"] as? [String: Any])?["value"]
    }

    func screenshot() throws -> Data {
        let result = try call("Page.captureScreenshot", ["format": "png", "captureBeyondViewport": true])
        guard let base64 = result["data"] as? String, let data = Data(base64Encoded: base64) else {
            throw Sockets.Failure("no screenshot data", 0)
        }
        return data
    }

    /// Sends one command and waits (up to 20 s) for its answer, skipping events.
    private func call(_ method: String, _ params: [String: Any], inSession: Bool = true) throws -> [String: Any] {
        nextID += 1
        var message: [String: Any] = ["id": nextID, "method": method, "params": params]
        if inSession { message["sessionId"] = session }
        var bytes = [UInt8](try JSONSerialization.data(withJSONObject: message))
        bytes.append(0)
        try bytes.withUnsafeBytes { raw in
            var offset = 0
            while offset < raw.count {
                let n = write(commands, raw.baseAddress! + offset, raw.count - offset)
                guard n > 0 else { throw Sockets.Failure("write to chromium") }
                offset += n
            }
        }
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline {
            if let end = pending.firstIndex(of: 0) {
                let frame = Array(pending[..<end])
                pending.removeSubrange(...end)
                guard let object = (try? JSONSerialization.jsonObject(with: Data(frame))) as? [String: Any] else { continue }
                guard object["id"] as? Int == nextID else { continue }
                if let error = object["error"] { throw Sockets.Failure("\(method): \(error)", 0) }
                return object["result"] as? [String: Any] ?? [:]
            }
            var p = pollfd(fd: events, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, 500) == 1 else { continue }
            var buffer = [UInt8](repeating: 0, count: 1 << 16)
            let n = read(events, &buffer, buffer.count)
            guard n > 0 else { throw Sockets.Failure("chromium closed the DevTools pipe", 0) }
            pending += buffer[..<n]
        }
        throw Sockets.Failure("\(method): no answer from chromium in 20 s", ETIMEDOUT)
    }
}
