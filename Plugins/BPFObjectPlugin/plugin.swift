import Foundation
import PackagePlugin

/// Builds l4lb's BPF programs (`bpf/*.bpf.c`) with clang `-target bpf` as part of the
/// package build and hands each object to BPFSteer as generated Swift source, so
/// `swift build` alone produces a binary that carries its own programs.
@main
struct BPFObjectPlugin: BuildToolPlugin {
    /// Program source, the headers it includes, and the enum its object is embedded in.
    static let programs: [(source: String, headers: [String], name: String)] = [
        ("xdp_filter.bpf.c", ["xdp_filter.h", "rate_limit.bpf.h"], "XDPFilterObject"),
        ("udp_relay.bpf.c", ["udp_relay.h", "nat_addresses.bpf.h"], "UDPRelayObject"),
        ("kernel_relay.bpf.c", ["kernel_relay.h", "kernel_relay_select.bpf.h", "kernel_relay_icmp.bpf.h", "nat_addresses.bpf.h"], "KernelRelayObject"),
    ]

    func createBuildCommands(context: PluginContext, target: Target) throws -> [Command] {
        let bpf = context.package.directoryURL.appending(path: "bpf")
        let script = bpf.appending(path: "build-object.sh")
        let work = context.pluginWorkDirectoryURL
        return BPFObjectPlugin.programs.map { program in
            let source = bpf.appending(path: program.source)
            let output = work.appending(path: "\(program.name).swift")
            return .buildCommand(
                displayName: "Compiling bpf/\(program.source)",
                executable: URL(fileURLWithPath: "/bin/sh"),
                arguments: [script.path, source.path, output.path, work.path, program.name],
                inputFiles: [source, script] + program.headers.map { bpf.appending(path: $0) },
                outputFiles: [output]
            )
        }
    }
}
