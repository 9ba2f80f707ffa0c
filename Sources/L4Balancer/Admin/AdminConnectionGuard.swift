import HTTPTypes
import NIOCore
import NIOHTTPTypes

#if canImport(Glibc)
import Glibc
#endif

/// One admin connection's keeper, between the HTTP decoder and Hummingbird's handler: it
/// takes the connection's place in the `AdminConnectionBudget`, keeps its deadlines, and
/// resets (RST, not FIN) what it will not wait for, so that neither the descriptor nor the
/// kernel's buffers for unread bytes outlive the exchange.
///
/// Deadlines, one at a time:
/// - waiting for a request, or for the rest of its head: `idleTimeout` (evictable);
/// - from a head to its end: `requestTimeout` (evictable), also when the answer came
///   first (a 404 to a POST, a refused token: the body is not waited for past it);
/// - requests read and being answered: `answerTimeout`, renewed by each answer (not
///   evictable), so a client that pipelines requests and never reads the answers goes too;
/// - once Hummingbird has closed its side (`Connection: close`): `idleTimeout` for the
///   client to close its own.
final class AdminConnectionGuard: ChannelDuplexHandler, RemovableChannelHandler, @unchecked Sendable {
    typealias InboundIn = HTTPRequestPart
    typealias InboundOut = HTTPRequestPart
    typealias OutboundIn = HTTPResponsePart
    typealias OutboundOut = HTTPResponsePart

    /// A reload waits at most 30 s for first health checks; an answer has twice that.
    static let answerTimeout = TimeAmount.seconds(60)
    /// Requests read and waiting for their answers at once (HTTP/1 pipelining).
    static let pipelineDepth = 8

    private let budget: AdminConnectionBudget
    /// The budget's number for this connection (set by `admit`).
    var number = 0
    private var context: ChannelHandlerContext?
    private var deadline: Scheduled<Void>?
    /// A head has been read and its end has not.
    private var reading = false
    /// The request being read has been answered already.
    private var answeredEarly = false
    /// Requests read in full and not yet answered.
    private var answering = 0
    private var bodyBytes = 0
    private var closed = false

    init(budget: AdminConnectionBudget) { self.budget = budget }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        let (admitted, evict) = budget.admit(self)
        // One event loop serves the API (`AdminThreads.eventLoopGroup`): the evicted connection's
        // descriptor is closed before this one is served, so the cap holds at every moment.
        if let evict, let loop = evict.context?.eventLoop {
            if loop.inEventLoop { evict.reset() } else { loop.execute { evict.reset() } }
        }
        guard admitted else {
            context.eventLoop.execute { self.reset() }
            return
        }
        arm(budget.limits.idleTimeout)
        context.channel.closeFuture.whenComplete { [self] _ in
            deadline?.cancel()
            budget.release(number)
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        // The context holds this handler: let go of it, or neither is ever freed.
        deadline?.cancel()
        deadline = nil
        self.context = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !closed else { return }
        switch unwrapInboundIn(data) {
        case .head(let head):
            reading = true
            answeredEarly = false
            bodyBytes = 0
            if let length = head.headerFields[.contentLength].flatMap(Int.init), length > budget.limits.maximumBody {
                budget.count(.oversized)
                return reset()
            }
            if answering == 0 {
                budget.setEvictable(number, true)
                arm(budget.limits.requestTimeout)
            }
        case .body(let bytes):
            bodyBytes += bytes.readableBytes
            if bodyBytes > budget.limits.maximumBody {
                budget.count(.oversized)
                return reset()
            }
        case .end:
            reading = false
            if answeredEarly {
                answeredEarly = false
                if answering == 0 { becomeIdle() }
            } else {
                answering += 1
                guard answering <= AdminConnectionGuard.pipelineDepth else { return reset() }
                budget.setEvictable(number, false)
                if answering == 1 { arm(AdminConnectionGuard.answerTimeout) }
            }
        }
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        context.write(data, promise: promise)
        guard case .end = unwrapOutboundIn(data) else { return }
        if answering > 0 {
            answering -= 1
            if answering > 0 {
                arm(AdminConnectionGuard.answerTimeout)
            } else if reading {
                budget.setEvictable(number, true)
                arm(budget.limits.requestTimeout)
            } else {
                becomeIdle()
            }
        } else if reading {
            // Answered before its end (the request timer keeps running for the rest).
            answeredEarly = true
        }
    }

    func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        if mode == .output, !closed {
            // Hummingbird is done (`Connection: close`): nothing more will be answered, and
            // the client has `idleTimeout` to close its side.
            answering = 0
            if !reading { becomeIdle() }
        }
        context.close(mode: mode, promise: promise)
    }

    private func becomeIdle() {
        budget.setEvictable(number, true)
        arm(budget.limits.idleTimeout)
    }

    private func arm(_ after: TimeAmount) {
        deadline?.cancel()
        guard let context else { return }
        deadline = context.eventLoop.scheduleTask(in: after) { [self] in
            budget.count(.timeout)
            reset()
        }
    }

    /// Closes with RST: unread bytes are dropped at once and no FIN-WAIT state remains.
    func reset() {
        guard !closed, let context else { return }
        closed = true
        deadline?.cancel()
        if let socket = context.channel as? SocketOptionProvider {
            _ = socket.setSoLinger(linger(l_onoff: 1, l_linger: 0))
        }
        context.close(promise: nil)
    }
}
