internal import CBPF
import Foundation

/// l4lb's XDP filter program, loaded once per process: its maps (pinned under `pinPath`,
/// so the lists and counters outlive the process) and its attachments. Every attachment is
/// a bpf_link, pinned too: after a crash the filter stays in force with the last lists,
/// and the next start swaps its own program in atomically (`bpf_link_update`).
///
/// Not thread-safe: the control plane serialises calls.
public final class XDPFilter {
    public enum Mode: String, Sendable { case native, generic }
    public enum Request: String, Sendable { case auto, native, generic }
    public enum List: Sendable { case blocked, allowed }

    public struct Attachment: Sendable {
        public let interface: String
        public let ifindex: UInt32
        public let mode: Mode
        /// True when a program a previous run left attached was replaced.
        public let replacedStale: Bool
        public let programID: UInt32
    }

    public let pinPath: String
    public private(set) var attachments: [Attachment] = []
    private let object: OpaquePointer
    private let programFD: Int32
    private let blockedV4: Int32, blockedV6: Int32, allowedV4: Int32, allowedV6: Int32
    private let ports: Int32, counters: Int32, settings: Int32
    private var linkFDs: [String: Int32] = [:]
    let cpus: Int
    /// What `settings[0]` holds (the program reads it; user space writes it whole).
    private var settingsValue = l4lb_settings()
    /// The rate limits' maps (XDPFilter+RateLimit), not pinned: they hold only what this
    /// process installs and learns.
    let rateRules: Int32, rateBuckets: Int32, rateFlows: Int32, rateExemptV4: Int32, rateExemptV6: Int32
    let rateCounters: Int32, rateTable: Int32
    /// The LRU maps' size (`rate_limit.table_size`).
    public let rateTableSize: Int
    var installedRateRules: [RateRule] = []

    /// Loads the program and opens (or creates and pins) its maps under `pinPath`; the
    /// rate limits track up to `rateTableSize` sources (and as many UDP flows).
    public init(pinPath: String, rateTableSize: Int = 65_536) throws(BPFError) {
        self.pinPath = pinPath
        try BPFFileSystem.prepare(pinPath)
        guard let bytes = Data(base64Encoded: XDPFilterObject.base64) else {
            throw BPFError("decoding the embedded XDP object", code: EINVAL)
        }
        let opened = bytes.withUnsafeBytes { l4lb_bpf_open_mem($0.baseAddress, $0.count, pinPath) }
        guard let opened, libbpf_get_error(UnsafeRawPointer(opened)) == 0 else {
            throw BPFError("opening the XDP object", code: errno)
        }
        for name in ["rate_buckets", "rate_flows"] {
            let sized = bpf_map__set_max_entries(bpf_object__find_map_by_name(opened, name), UInt32(clamping: rateTableSize))
            guard sized == 0 else {
                bpf_object__close(opened)
                throw BPFError("sizing the rate-limit map \(name) to \(rateTableSize)", code: sized)
            }
        }
        self.rateTableSize = rateTableSize
        let loaded = bpf_object__load(opened)
        guard loaded == 0 else {
            bpf_object__close(opened)
            throw BPFError("loading the XDP filter into the kernel (pinned maps under \(pinPath) from another version must be removed)", code: loaded)
        }
        object = opened
        func mapFD(_ name: String) -> Int32 { bpf_map__fd(bpf_object__find_map_by_name(opened, name)) }
        blockedV4 = mapFD("blocked_v4")
        blockedV6 = mapFD("blocked_v6")
        allowedV4 = mapFD("allowed_v4")
        allowedV6 = mapFD("allowed_v6")
        ports = mapFD("blocked_ports")
        counters = mapFD("counters")
        settings = mapFD("settings")
        rateRules = mapFD("rate_rules")
        rateBuckets = mapFD("rate_buckets")
        rateFlows = mapFD("rate_flows")
        rateExemptV4 = mapFD("rate_exempt_v4")
        rateExemptV6 = mapFD("rate_exempt_v6")
        rateCounters = mapFD("rate_counters")
        rateTable = mapFD("rate_table")
        programFD = bpf_program__fd(bpf_object__find_program_by_name(opened, "l4lb_xdp_filter"))
        do {
            cpus = try possibleCPUs()
        } catch {
            bpf_object__close(opened)
            throw error
        }
        try forgetOtherInterfaces()
        try registerCounters(ifindex: 0)
    }

    deinit {
        for fd in linkFDs.values { close(fd) }
        bpf_object__close(object)
    }

    public var programID: UInt32 { UInt32(max(l4lb_prog_id(programFD), 0)) }

    // MARK: Attaching

    /// Attaches to `interface` (native first under `.auto`), replacing the program a
    /// previous run of l4lb left pinned there.
    @discardableResult
    public func attach(_ interface: String, _ request: Request) throws(BPFError) -> Attachment {
        let ifindex = if_nametoindex(interface)
        guard ifindex != 0 else { throw BPFError("interface \(interface)", code: ENODEV) }
        try registerCounters(ifindex: ifindex)
        let path = linkPath(interface)
        if let existing = linkFDs[interface] {
            close(existing)
            linkFDs[interface] = nil
        }

        var replaced = false
        var linkFD: Int32 = -1
        let stale = bpf_obj_get(path)
        if stale >= 0 {
            var staleProgram: UInt32 = 0
            var staleMode: UInt8 = 0
            _ = l4lb_xdp_query(Int32(ifindex), &staleMode, &staleProgram)
            let native = staleMode == UInt8(XDP_ATTACHED_DRV) || staleMode == UInt8(XDP_ATTACHED_HW)
            // A link keeps its mode: one in the other mode than asked for is replaced.
            let modeFits = request == .auto || (request == .native) == native
            if modeFits, l4lb_link_ifindex(stale, &staleProgram) == Int32(ifindex), l4lb_xdp_link_update(stale, programFD) == 0 {
                linkFD = stale
                replaced = true
            } else {
                // A link for an interface that is gone (or is another one now).
                close(stale)
                unlink(path)
            }
        }
        if linkFD < 0 {
            var mode: UInt8 = 0
            var existing: UInt32 = 0
            if l4lb_xdp_query(Int32(ifindex), &mode, &existing) == 0, existing != 0 {
                throw BPFError("interface \(interface) already has an XDP program (id \(existing)) that l4lb did not attach; remove it first", code: EBUSY)
            }
            let flags: [UInt32] = switch request {
            case .auto: [UInt32(XDP_FLAGS_DRV_MODE), UInt32(XDP_FLAGS_SKB_MODE)]
            case .native: [UInt32(XDP_FLAGS_DRV_MODE)]
            case .generic: [UInt32(XDP_FLAGS_SKB_MODE)]
            }
            var lastError: Int32 = 0
            for flag in flags {
                let fd = l4lb_xdp_link_create(programFD, Int32(ifindex), flag)
                if fd >= 0 { linkFD = fd; break }
                lastError = -fd
            }
            guard linkFD >= 0 else {
                throw BPFError("attaching XDP (\(request.rawValue)) to \(interface)", code: lastError)
            }
            let pinned = bpf_obj_pin(linkFD, path)
            guard pinned == 0 else {
                close(linkFD)
                throw BPFError("pinning the XDP link at \(path)", code: pinned)
            }
        }
        linkFDs[interface] = linkFD
        var attachedMode: UInt8 = 0
        var programID: UInt32 = 0
        _ = l4lb_xdp_query(Int32(ifindex), &attachedMode, &programID)
        let attachment = Attachment(
            interface: interface, ifindex: ifindex,
            mode: attachedMode == UInt8(XDP_ATTACHED_DRV) || attachedMode == UInt8(XDP_ATTACHED_HW) ? .native : .generic,
            replacedStale: replaced, programID: programID)
        attachments.removeAll { $0.interface == interface }
        attachments.append(attachment)
        return attachment
    }

    /// Detaches from every interface (unpins and closes the links). The maps stay pinned.
    public func detachAll() {
        for (interface, fd) in linkFDs {
            unlink(linkPath(interface))
            close(fd)
        }
        linkFDs = [:]
        attachments = []
    }

    /// Unpins links a previous run left for interfaces not in `interfaces` (the config no
    /// longer filters there): their programs detach.
    public func removeLinks(except interfaces: [String]) {
        XDPFilter.removeLinks(pinPath: pinPath, except: interfaces)
    }

    /// The same without a loaded program (it needs only the filesystem).
    public static func removeLinks(pinPath: String, except interfaces: [String]) {
        let keep = Set(interfaces.map { "link_\($0)" })
        let pinned = (try? FileManager.default.contentsOfDirectory(atPath: pinPath)) ?? []
        for name in pinned where name.hasPrefix("link_") && !keep.contains(name) {
            unlink("\(pinPath)/\(name)")
        }
    }

    private func linkPath(_ interface: String) -> String { "\(pinPath)/link_\(interface)" }

    // MARK: Counters

    /// Counters for `ifindex`, from zero (an interface number may have been someone else's).
    private func registerCounters(ifindex: UInt32) throws(BPFError) {
        var key = ifindex
        var zero = [UInt8](repeating: 0, count: cpus * MemoryLayout<l4lb_counters>.stride)
        let result = bpf_map_update_elem(counters, &key, &zero, UInt64(ifindex == 0 ? BPF_NOEXIST : BPF_ANY))
        if result != 0, -result != EEXIST, errno != EEXIST {
            throw BPFError("registering counters for ifindex \(ifindex)", code: errno)
        }
    }

    /// Drops the counters of interfaces a previous run attached to (the map would fill
    /// with interfaces that came and went); key 0 stays.
    private func forgetOtherInterfaces() throws(BPFError) {
        var keys: [UInt32] = []
        var key: UInt32 = 0, next: UInt32 = 0
        var first = true
        while (first ? bpf_map_get_next_key(counters, nil, &next) : bpf_map_get_next_key(counters, &key, &next)) == 0 {
            first = false
            key = next
            if key != 0 { keys.append(key) }
        }
        for var stale in keys { _ = bpf_map_delete_elem(counters, &stale) }
    }

    /// Tells the program how many port rules exist (it drops packets that hide their
    /// ports only while there are some).
    public func setPortRuleCount(_ count: Int) throws(BPFError) {
        settingsValue.port_rules = UInt32(clamping: count)
        try writeSettings()
    }

    func writeSettings() throws(BPFError) {
        var key: UInt32 = 0
        guard bpf_map_update_elem(settings, &key, &settingsValue, UInt64(BPF_ANY)) == 0 else {
            throw BPFError("updating the filter settings", code: errno)
        }
    }

    /// Tells the program whether any rate rule exists (none: it skips their lookups).
    func setRateRuleCount(_ count: Int) throws(BPFError) {
        settingsValue.rate_rules = UInt32(clamping: count)
        try writeSettings()
    }

    /// Packets by reason on `ifindex` (0: interfaces nobody registered), summed over CPUs.
    public func packets(ifindex: UInt32) -> [FilterReason: UInt64] {
        var key = ifindex
        var values = [l4lb_counters](repeating: l4lb_counters(), count: cpus)
        guard bpf_map_lookup_elem(counters, &key, &values) == 0 else { return [:] }
        var totals: [FilterReason: UInt64] = [:]
        for reason in FilterReason.allCases {
            totals[reason] = values.reduce(0) { sum, perCPU in
                withUnsafeBytes(of: perCPU.packets) { $0.load(fromByteOffset: reason.rawValue * 8, as: UInt64.self) } &+ sum
            }
        }
        return totals
    }

    // MARK: Lists

    /// Sets the origins of one entry; an empty set removes it.
    public func set(_ entry: FilterEntry, in list: List, origins: FilterOrigin) throws(BPFError) {
        switch entry {
        case .source(let prefix):
            let fd = fd(for: prefix.family, list)
            var value = origins.rawValue
            let result: Int32 = withLPMKey(prefix) { key in
                origins.isEmpty ? bpf_map_delete_elem(fd, key) : bpf_map_update_elem(fd, key, &value, UInt64(BPF_ANY))
            }
            if result != 0, !(origins.isEmpty && errno == ENOENT) {
                throw BPFError("updating \(list) source \(prefix)", code: errno)
            }
        case .port(let rule):
            guard list == .blocked else { return }
            var key = UInt32(rule.port)
            var value = l4lb_port_rule()
            _ = bpf_map_lookup_elem(ports, &key, &value)
            switch rule.transport {
            case .tcp: value.tcp = origins.rawValue
            case .udp: value.udp = origins.rawValue
            }
            guard bpf_map_update_elem(ports, &key, &value, UInt64(BPF_ANY)) == 0 else {
                throw BPFError("updating blocked port \(rule)", code: errno)
            }
        }
    }

    /// Every entry of `list` in the maps, with its origins.
    public func entries(_ list: List) -> [FilterEntry: FilterOrigin] {
        var result: [FilterEntry: FilterOrigin] = [:]
        for family in [SourcePrefix.Family.v4, .v6] {
            let fd = fd(for: family, list)
            let width = family == .v4 ? 4 : 16
            var key = [UInt8](repeating: 0, count: 4 + width)
            var next = key
            var first = true
            while (first ? bpf_map_get_next_key(fd, nil, &next) : bpf_map_get_next_key(fd, &key, &next)) == 0 {
                first = false
                key = next
                var value: UInt8 = 0
                guard bpf_map_lookup_elem(fd, &key, &value) == 0 else { continue }
                let length = key.withUnsafeBytes { Int($0.load(as: UInt32.self)) }
                result[.source(SourcePrefix(family: family, bytes: Array(key[4...]), length: length))] = FilterOrigin(rawValue: value)
            }
        }
        if list == .blocked {
            var key: UInt32 = 0
            var value = l4lb_port_rule()
            for port in 1...65535 {
                key = UInt32(port)
                guard bpf_map_lookup_elem(ports, &key, &value) == 0 else { continue }
                if value.tcp != 0 { result[.port(PortRule(.tcp, UInt16(port)))] = FilterOrigin(rawValue: value.tcp) }
                if value.udp != 0 { result[.port(PortRule(.udp, UInt16(port)))] = FilterOrigin(rawValue: value.udp) }
            }
        }
        return result
    }

    private func fd(for family: SourcePrefix.Family, _ list: List) -> Int32 {
        switch (family, list) {
        case (.v4, .blocked): blockedV4
        case (.v6, .blocked): blockedV6
        case (.v4, .allowed): allowedV4
        case (.v6, .allowed): allowedV6
        }
    }

    private func withLPMKey<R>(_ prefix: SourcePrefix, _ body: (UnsafeRawPointer) -> R) -> R {
        var key = [UInt8](repeating: 0, count: 4 + prefix.bytes.count)
        withUnsafeBytes(of: UInt32(prefix.length)) { key.replaceSubrange(0..<4, with: $0) }
        key.replaceSubrange(4..., with: prefix.bytes)
        return key.withUnsafeBytes { body($0.baseAddress!) }
    }
}
