// swift-tools-version:6.1
import PackageDescription

/// Release builds of the data plane skip Swift's run-time exclusivity checks: every access
/// to a worker's stored properties otherwise calls `swift_beginAccess`, which was about a
/// third of l4lb's user-space time under rr-keepalive (`bench/PROFILE.md`). The compiler's
/// static checks still apply, and debug builds keep the run-time ones.
let dataPlaneSettings: [SwiftSetting] = [
    .unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release))
]

let package = Package(
    name: "l4lb",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "l4lb", targets: ["l4lb"]),
        .library(name: "L4Balancer", targets: ["L4Balancer"]),
        .library(name: "URing", targets: ["URing"]),
        .library(name: "BPFSteer", targets: ["BPFSteer"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-atomics", from: "1.3.0"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.2.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        // Already in the graph through Hummingbird; named for the admin API's connection guard.
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-extras", from: "1.35.2"),
        .package(url: "https://github.com/apple/swift-http-types", from: "1.8.0"),
    ],
    targets: [
        .systemLibrary(
            name: "CURing",
            pkgConfig: "liburing",
            providers: [.apt(["liburing-dev"])]
        ),
        .target(
            name: "URing",
            dependencies: ["CURing"],
            swiftSettings: dataPlaneSettings
        ),
        .target(name: "CLinux"),
        .systemLibrary(
            name: "CBPF",
            pkgConfig: "libbpf",
            providers: [.apt(["libbpf-dev"])]
        ),
        .systemLibrary(
            name: "COpenSSL",
            pkgConfig: "openssl",
            providers: [.apt(["libssl-dev"])]
        ),
        .plugin(name: "BPFObjectPlugin", capability: .buildTool()),
        .target(
            name: "BPFSteer",
            dependencies: ["CBPF"],
            plugins: ["BPFObjectPlugin"]
        ),
        .target(
            name: "L4Balancer",
            dependencies: [
                "URing",
                "CLinux",
                "BPFSteer",
                "COpenSSL",
                .product(name: "Atomics", package: "swift-atomics"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Yams", package: "Yams"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOHTTPTypes", package: "swift-nio-extras"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
            ],
            swiftSettings: dataPlaneSettings
        ),
        .executableTarget(
            name: "l4lb",
            dependencies: [
                "L4Balancer",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            ]
        ),
        .target(name: "CMallocCounter"),
        .executableTarget(
            name: "l4lb-balancer-bench",
            dependencies: ["L4Balancer", "CMallocCounter"]
        ),
        .testTarget(name: "URingTests", dependencies: ["URing"]),
        .testTarget(name: "L4BalancerTests", dependencies: ["L4Balancer", "COpenSSL"]),
        .testTarget(name: "BPFSteerTests", dependencies: ["BPFSteer", "CTestSupport", "L4Balancer"]),
        .target(name: "CTestSupport", path: "Tests/CTestSupport"),
        .testTarget(name: "EndToEndTests", dependencies: ["L4Balancer", "BPFSteer", "CTestSupport", "COpenSSL"]),
    ]
)
