import ArgumentParser
import Foundation
import L4Balancer
import Logging
import ServiceLifecycle

@main
struct L4LBCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "l4lb",
        abstract: "A Layer-4 (TCP/UDP) load balancer on io_uring.",
        subcommands: [Run.self, Check.self, Stats.self, Reload.self, Drain.self, Block.self, RateLimit.self, Discovery.self],
        defaultSubcommand: Run.self)
}

struct ConfigOption: ParsableArguments {
    @Option(name: .long, help: "Path to the YAML configuration.")
    var config: String = "l4lb.yaml"
}

/// Prints every config error as `path: message` and exits 2 (DESIGN §6).
func loadConfigOrExit(_ path: String) throws -> Config {
    switch ConfigParser.load(path: path) {
    case .success(let config):
        return config
    case .failure(let errors):
        for error in errors.errors {
            FileHandle.standardError.write(Data("\(error)\n".utf8))
        }
        FileHandle.standardError.write(Data("\(errors.seeAlso)\n".utf8))
        throw ExitCode(2)
    }
}

struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Validate a configuration file.")
    @OptionGroup var options: ConfigOption

    @Flag(help: "Also print a digest of each cluster's Maglev table or hash ring; equal digests route keys alike.")
    var showTables = false

    func run() throws {
        let config = try loadConfigOrExit(options.config)
        print("configuration OK")
        guard showTables else { return }
        let snapshot = Snapshot(config: config)
        for cluster in snapshot.clusters {
            if let digest = cluster.tableDigest(endpoints: snapshot.endpoints) {
                print("cluster \(cluster.name): \(digest)")
            }
        }
    }
}

struct Run: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Run the load balancer.")
    @OptionGroup var options: ConfigOption

    enum LogFormat: String, ExpressibleByArgument, CaseIterable { case text, json }

    @Option(name: .long, help: "Log lines as text (default) or as one JSON object per line.")
    var logFormat: LogFormat = .text

    func run() async throws {
        signal(SIGPIPE, SIG_IGN)
        // SIGHUP is a reload; until the handler is installed, one must not kill the process.
        signal(SIGHUP, SIG_IGN)
        signal(SIGUSR1, SIG_IGN)
        ResourceLimits.raiseOpenFileLimit()
        ResourceLimits.returnLargeAllocationsToKernel()
        let level = ProcessInfo.processInfo.environment["L4LB_LOG_LEVEL"].flatMap(Logger.Level.init(rawValue:)) ?? .info
        let format = logFormat
        LoggingSystem.bootstrap { label in
            switch format {
            case .text:
                var handler = StreamLogHandler.standardError(label: label)
                handler.logLevel = level
                return handler
            case .json:
                var handler = JSONLogHandler(label: label)
                handler.logLevel = level
                return handler
            }
        }
        let logger = Logger(label: "l4lb")
        let config = try loadConfigOrExit(options.config)
        let pool: WorkerPool
        do {
            pool = try WorkerPool(config: config, configPath: options.config, logger: logger)
        } catch {
            logger.critical("\(error)")
            throw ExitCode(1)
        }
        let group = ServiceGroup(configuration: .init(
            services: [
                .init(service: pool, successTerminationBehavior: .gracefullyShutdownGroup),
                .init(service: AdminAPI.application(pool: pool, logger: logger)),
                .init(service: ReloadOnSignal(pool: pool)),
            ],
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger))
        do {
            try await group.run()
        } catch {
            logger.critical("\(error)")
            throw ExitCode(1)
        }
    }
}
