import Foundation
import PackagePlugin

/// Builds `bpf/xdp_filter.bpf.c` with clang `-target bpf` as part of the package build and
/// hands the object to BPFSteer as generated Swift source, so `swift build` alone produces
/// a binary that carries its own filter.
@main
struct BPFObjectPlugin: BuildToolPlugin {
    func createBuildCommands(context: PluginContext, target: Target) throws -> [Command] {
        let bpf = context.package.directoryURL.appending(path: "bpf")
        let source = bpf.appending(path: "xdp_filter.bpf.c")
        let script = bpf.appending(path: "build-object.sh")
        let work = context.pluginWorkDirectoryURL
        let output = work.appending(path: "XDPFilterObject.swift")
        return [
            .buildCommand(
                displayName: "Compiling bpf/xdp_filter.bpf.c",
                executable: URL(fileURLWithPath: "/bin/sh"),
                arguments: [script.path, source.path, output.path, work.path],
                inputFiles: [source, bpf.appending(path: "xdp_filter.h"), bpf.appending(path: "rate_limit.bpf.h"), script],
                outputFiles: [output]
            )
        ]
    }
}
