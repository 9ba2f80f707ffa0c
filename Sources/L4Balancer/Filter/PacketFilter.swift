import BPFSteer
import Foundation
import Logging

/// The control plane's side of the blocklist (DESIGN §7). It keeps every entry with its
/// origins (config, runtime), writes them to the XDP program's pinned maps, and publishes
/// the user-space `SourceFilter` the workers enforce where XDP is not attached. Changes
/// are applied as a diff — additions first, then removals — so the lists are never empty
/// in between. Calls are serialised by its own lock; none is on the data path.
public final class PacketFilter: @unchecked Sendable {
    public enum Mode: String, Sendable { case native, generic, userspace }

    public struct Interface: Sendable {
        public let name: String
        public let ifindex: UInt32
        public let mode: Mode
        public let programID: UInt32
    }

    public struct EntryError: Error, CustomStringConvertible {
        public enum Kind: Sendable { case invalid, notFound, fromConfig, failed }
        public let kind: Kind
        public let description: String
    }

    let store = FilterStore()
    let lock = NSLock()
    private let logger: Logger
    var xdp: XDPFilter?
    private var blocked: [FilterEntry: FilterOrigin] = [:]
    private var allowed: [SourcePrefix: FilterOrigin] = [:]
    var attached: [Interface] = []
    /// Where XDP is attached, and how.
    public var interfaces: [Interface] { lock.withLock { attached } }
    /// True when the workers check every accepted connection (XDP is not attached).
    public private(set) var userspace = true
    /// Why XDP is not in use, when it is not.
    public private(set) var fallbackReason: String?

    public struct StartError: Error, CustomStringConvertible {
        public let description: String
    }

    /// Loads the XDP program and its pinned lists, applies the config's lists, then
    /// attaches (so a fresh start never filters with empty lists). With `mode: auto` a
    /// program that cannot load or attach leaves the lists to user space; with `native` or
    /// `generic` it is an error. `rateTableSize`: sources the program's rate limits track.
    public init(_ config: Config.Filter, rateTableSize: Int = Config.defaultRateLimitSources, logger: Logger) throws(StartError) {
        self.logger = logger
        do {
            xdp = try XDPFilter(pinPath: config.pinPath, rateTableSize: rateTableSize)
        } catch {
            if config.wantsXDP, config.mode != .auto {
                throw StartError(description: "filter.xdp.mode: \(config.mode.rawValue): \(error)")
            }
            fallbackReason = "\(error)"
            // A program a previous run pinned would go on filtering with lists nobody can
            // change any more: unpin its links (that needs only the filesystem).
            XDPFilter.removeLinks(pinPath: config.pinPath, except: [])
            if config.wantsXDP || !config.blockSources.isEmpty || !config.blockPorts.isEmpty {
                logger.warning("XDP filter unavailable; the lists are enforced in user space, and run-time entries last until exit", metadata: ["error": "\(error)"])
            }
        }
        if let xdp {
            for (entry, origins) in xdp.entries(.blocked) { blocked[entry] = origins }
            for (entry, origins) in xdp.entries(.allowed) { if case .source(let prefix) = entry { allowed[prefix] = origins } }
            xdp.removeLinks(except: config.wantsXDP ? config.interfaces : [])
        }
        do {
            try apply(config)
            try xdp?.setPortRuleCount(portRules)
        } catch {
            throw StartError(description: "filter: \(error)")
        }
        if config.wantsXDP {
            if let xdp {
                do {
                    attached = try config.interfaces.map { name throws(BPFError) in
                        let attachment = try xdp.attach(name, XDPFilter.Request(rawValue: config.mode.rawValue) ?? .auto)
                        logger.info(attachment.replacedStale ? "XDP filter replaced the program a previous run left attached" : "XDP filter attached",
                                    metadata: ["interface": "\(name)", "mode": "\(attachment.mode.rawValue)", "program": "\(attachment.programID)"])
                        return Interface(name: name, ifindex: attachment.ifindex, mode: attachment.mode == .native ? .native : .generic, programID: attachment.programID)
                    }
                    userspace = false
                } catch {
                    xdp.detachAll()
                    attached = []
                    if config.mode != .auto { throw StartError(description: "filter.xdp.interfaces: \(error)") }
                    fallbackReason = "\(error)"
                    logger.warning("XDP filter could not attach; the lists are enforced in user space", metadata: ["error": "\(error)"])
                }
            }
        }
        publish()
    }

    /// Detaches XDP (the maps stay pinned for the next start).
    public func shutdown() {
        lock.withLock {
            xdp?.detachAll()
            attached = []
        }
    }

    // MARK: Lists

    /// Applies a config's lists as a diff against the running ones (start and reload);
    /// returns how many config entries it added and removed.
    @discardableResult
    func apply(_ config: Config.Filter) throws(BPFError) -> (added: Int, removed: Int) {
        lock.lock()
        // Published even when a write fails part of the way: the workers see what is in force.
        defer {
            publishLocked()
            lock.unlock()
        }
        var added = 0, removed = 0
        let wantedBlocked = Set(config.blockSources.map(FilterEntry.source) + config.blockPorts.map(FilterEntry.port))
        let wantedAllowed = Set(config.allowSources)
        for entry in wantedBlocked where !(blocked[entry]?.contains(.config) ?? false) {
            try write(entry, .blocked, blocked[entry, default: []].union(.config))
            added += 1
        }
        for prefix in wantedAllowed where !(allowed[prefix]?.contains(.config) ?? false) {
            try write(.source(prefix), .allowed, allowed[prefix, default: []].union(.config))
            added += 1
        }
        for (entry, origins) in blocked where origins.contains(.config) && !wantedBlocked.contains(entry) {
            try write(entry, .blocked, origins.subtracting(.config))
            removed += 1
        }
        for (prefix, origins) in allowed where origins.contains(.config) && !wantedAllowed.contains(prefix) {
            try write(.source(prefix), .allowed, origins.subtracting(.config))
            removed += 1
        }
        return (added, removed)
    }

    /// `l4lb block add`: a run-time entry, kept across reloads (and restarts, pinned).
    public func add(_ text: String) -> Result<FilterEntry, EntryError> {
        guard case .success(let entry) = PacketFilter.parse(text) else { return PacketFilter.parse(text) }
        lock.lock()
        defer { lock.unlock() }
        do {
            try write(entry, .blocked, blocked[entry, default: []].union(.runtime))
        } catch {
            return .failure(EntryError(kind: .failed, description: "\(error)"))
        }
        publishLocked()
        return .success(entry)
    }

    /// `l4lb block remove`: removes a run-time entry. An entry from the config file stays
    /// (it would come back on the next reload): that is an error naming the config.
    public func remove(_ text: String) -> Result<FilterEntry, EntryError> {
        guard case .success(let entry) = PacketFilter.parse(text) else { return PacketFilter.parse(text) }
        lock.lock()
        defer { lock.unlock() }
        guard let origins = blocked[entry] else {
            return .failure(EntryError(kind: .notFound, description: "\(entry) is not in the blocklist"))
        }
        guard origins.contains(.runtime) else {
            return .failure(EntryError(kind: .fromConfig, description: "\(entry) comes from the config file (filter.block_sources / block_ports): remove it there and reload"))
        }
        do {
            try write(entry, .blocked, origins.subtracting(.runtime))
        } catch {
            return .failure(EntryError(kind: .failed, description: "\(error)"))
        }
        publishLocked()
        return .success(entry)
    }

    private static func parse(_ text: String) -> Result<FilterEntry, EntryError> {
        FilterEntry.parse(text).mapError { EntryError(kind: .invalid, description: $0.description) }
    }

    /// Every entry with where it came from, blocked then allowed, each sorted.
    public func list() -> (blocked: [(FilterEntry, FilterOrigin)], allowed: [(SourcePrefix, FilterOrigin)]) {
        lock.withLock {
            (blocked.sorted { $0.key.description < $1.key.description }.map { ($0.key, $0.value) },
             allowed.sorted { $0.key.description < $1.key.description }.map { ($0.key, $0.value) })
        }
    }

    /// Packets by reason per attached interface, from the XDP program's counters.
    public func kernelCounters() -> [(Interface, [FilterReason: UInt64])] {
        lock.withLock {
            guard let xdp else { return [] }
            return attached.map { ($0, xdp.packets(ifindex: $0.ifindex)) }
        }
    }

    private func write(_ entry: FilterEntry, _ list: XDPFilter.List, _ origins: FilterOrigin) throws(BPFError) {
        // A new port rule is counted before it is written, a removed one after.
        if case .port = entry, !origins.isEmpty { try xdp?.setPortRuleCount(portRules + 1) }
        try xdp?.set(entry, in: list, origins: origins)
        switch (entry, list) {
        case (_, .blocked): blocked[entry] = origins.isEmpty ? nil : origins
        case (.source(let prefix), .allowed): allowed[prefix] = origins.isEmpty ? nil : origins
        case (.port, .allowed): break
        }
        if case .port = entry { try xdp?.setPortRuleCount(portRules) }
    }

    private var portRules: Int {
        blocked.keys.reduce(0) { count, entry in if case .port = entry { count + 1 } else { count } }
    }

    private func publish() {
        lock.withLock { publishLocked() }
    }

    private func publishLocked() {
        store.publish(SourceFilter(enforcing: userspace, blocked: Array(blocked.keys), allowed: Array(allowed.keys)))
    }
}
