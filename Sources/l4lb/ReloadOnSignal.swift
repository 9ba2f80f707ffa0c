import Foundation
import L4Balancer
import ServiceLifecycle
import UnixSignals

/// SIGHUP = reload (DESIGN §6): each signal re-reads the config file, off the async
/// executors; signals that arrive during a reload are coalesced into one more.
/// SIGUSR1 = reopen the access log's file (logrotate).
struct ReloadOnSignal: Service {
    let pool: WorkerPool

    func run() async throws {
        let signals = await UnixSignalsSequence(trapping: .sighup, .sigusr1)
        for await signal in signals.cancelOnGracefulShutdown() {
            if signal == .sigusr1 {
                pool.accessLog?.reopen()
                continue
            }
            await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
                DispatchQueue.global().async {
                    _ = pool.reload(trigger: "SIGHUP")
                    done.resume()
                }
            }
        }
    }
}
