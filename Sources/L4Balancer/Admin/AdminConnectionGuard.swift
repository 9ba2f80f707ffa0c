import HTTPTypes
import NIOCore
import NIOHTTPTypes

#if canImport(Glibc)
import Glibc
#endif

/// One admin connection's keeper, between the HTTP decoder and Hummingbird's handler: it
/// takes the connection's place in the `AdminConnectionBudget`, keeps its deadlines, and
/// resets (RST, not FIN) what it will not read, so that neither the descriptor nor the
/// kernel's buffers for the unread bytes outlive the exchange.
///
/// Deadlines: waiting for a request (or for the rest of its head) `idleTimeout`; from a
/// head to its end, `requestTimeout`; none while a request is being answered.
final class AdminConnectionGuard: ChannelDuplexHandler, RemovableChannelHandler, @unchecked Sendable {
    typealias InboundIn = HTTPRequestPart
    typealias InboundOut = HTTPRequestPart
    typealias OutboundIn = HTTPResponsePart
    typealias OutboundOut = HTTPResponsePart

    private let budget: AdminConnectionBudget
    /// The budget's number for this connection (set by `admit`).
    var number = 0
    private var context: ChannelHandlerContext?
    private var deadline: Scheduled<Void>?
    /// A head has been read and its end has not (HTTP/1 reads one request at a time; a
    /// pipelined one may be read while an earlier one is answered).
    private var reading = false
    /// Requests read in full and not yet answered.
    private var answering = 0
    private var bodyBytes = 0
    private var closed = false

    init(budget: AdminConnectionBudget) { self.budget = budget }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        let (admitted, evict) = budget.admit(self)
        // One event loop serves the API (`AdminAPI.adminEventLoop`): the evicted connection's
        // descriptor is closed before this one is served, so the cap holds at every moment.
        if let evict, let loop = evict.context?.eventLoop {
            if loop.inEventLoop { evict.reset() } else { loop.execute { evict.reset() } }
        }
        guard admitted else {
            reset()
            return
        }
        arm(budget.limits.idleTimeout, reason: .timeout)
        context.channel.closeFuture.whenComplete { [self] _ in
            deadline?.cancel()
            budget.release(number)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !closed else { return }
        switch unwrapInboundIn(data) {
        case .head(let head):
            reading = true
            bodyBytes = 0
            // Sending a head or body is not being answered: a place others may take.
            if answering == 0 { budget.setEvictable(number, true) }
            if let length = head.headerFields[.contentLength].flatMap(Int.init), length > budget.limits.maximumBody {
                budget.count(.oversized)
                reset()
                return
            }
            arm(budget.limits.requestTimeout, reason: .timeout)
        case .body(let bytes):
            bodyBytes += bytes.readableBytes
            if bodyBytes > budget.limits.maximumBody {
                budget.count(.oversized)
                reset()
                return
            }
        case .end:
            reading = false
            answering += 1
            deadline?.cancel()
            budget.setEvictable(number, false)
        }
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        guard case .end = unwrapOutboundIn(data) else {
            context.write(data, promise: promise)
            return
        }
        guard answering > 0 else {
            // The answer to the request still being read (a 404 to a POST, a refused token):
            // the rest of its body is never read, so the connection goes with the answer.
            let written = promise ?? context.eventLoop.makePromise()
            context.write(data, promise: written)
            if reading { written.futureResult.whenComplete { [self] _ in reset() } }
            return
        }
        answering -= 1
        context.write(data, promise: promise)
        // All answered and nothing being read: idle until the next request.
        if answering == 0, !reading {
            budget.setEvictable(number, true)
            arm(budget.limits.idleTimeout, reason: .timeout)
        }
    }

    private func arm(_ after: TimeAmount, reason: AdminConnectionBudget.Reset) {
        deadline?.cancel()
        guard let context else { return }
        deadline = context.eventLoop.scheduleTask(in: after) { [self] in
            budget.count(reason)
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
