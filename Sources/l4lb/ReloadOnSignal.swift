import Foundation
import L4Balancer
import ServiceLifecycle
import UnixSignals

/// SIGHUP = reload (DESIGN §6): each signal re-reads the config file, off the async
/// executors; signals that arrive during a reload are coalesced into one more.
struct ReloadOnSignal: Service {
    let pool: WorkerPool

    func run() async throws {
        let signals = await UnixSignalsSequence(trapping: .sighup)
        for await _ in signals.cancelOnGracefulShutdown() {
            await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
                DispatchQueue.global().async {
                    _ = pool.reload(trigger: "SIGHUP")
                    done.resume()
                }
            }
        }
    }
}
