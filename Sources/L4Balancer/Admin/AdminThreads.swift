import CLinux
import Foundation
import NIOCore
import NIOPosix

/// Where the admin API's work runs: never on a worker, and below the workers' priority
/// (nice 10), so however busy the API is made, a worker that wants the CPU gets it first.
/// - The network: one event-loop thread (`eventLoopGroup`).
/// - Route handlers: on that same thread, through `taskExecutor` (Hummingbird would run
///   them on Swift's shared pool at normal priority).
/// - Blocking control-plane work (reload, drain, blocklist), which must not stall that
///   thread: one control thread of its own, in order (`ControlThread`).
enum AdminThreads {
    static let eventLoopGroup: MultiThreadedEventLoopGroup = {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        group.next().execute { _ = CLinux_set_current_thread_nice(10) }
        return group
    }()

    static let taskExecutor = EventLoopTaskExecutor(eventLoopGroup.next())

    static let control = ControlThread(name: "l4lb-admin-control")
}

/// Runs a task's jobs on one NIO event loop.
final class EventLoopTaskExecutor: TaskExecutor, @unchecked Sendable {
    let loop: any EventLoop

    init(_ loop: any EventLoop) { self.loop = loop }

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        loop.execute { job.runSynchronously(on: self.asUnownedTaskExecutor()) }
    }
}
