// swift-tools-version:6.0
//
// kmsfs: a FUSE filesystem with per-file envelope encryption.
//
// Layers, lowest first (each module only imports the ones above it in this list):
//   CLibCrypto, CSystem, CFuseBridge, CCurlBridge  C libraries and the few lines of C Swift cannot express
//   KmsfsSystem      locks, logging, POSIX errors and file I/O helpers shared by every layer
//   KmsfsCrypto      secure key memory, AES-256-GCM, AES-256-SIV, HMAC/HKDF, CSPRNG  (no files, no KMS)
//   KmsfsFormat      volume config, file header, chunk layout, chunk codec        (no FUSE, no HTTP)
//   KmsfsKeys        key providers (local; AWS KMS over libcurl with SigV4), key service, audit log
//                                                                                (no FUSE, no chunks)
//   KmsfsFilesystem  FUSE handlers, name mapping, open-file table, chunked I/O     (no HTTP, no header bytes)
//   kmsfs            the command-line tool
//
// The only package dependency is swift-argument-parser (the CLI's commands, options and help text).
import PackageDescription

let package = Package(
    name: "kmsfs",
    products: [
        .executable(name: "kmsfs", targets: ["kmsfs"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        .systemLibrary(
            name: "CLibCrypto",
            pkgConfig: "libcrypto",
            providers: [.apt(["libssl-dev"])]
        ),
        .target(
            name: "CSystem",
            linkerSettings: []
        ),
        .target(
            name: "CFuseBridge",
            linkerSettings: [.linkedLibrary("fuse3"), .linkedLibrary("pthread")]
        ),
        .target(
            name: "CCurlBridge",
            linkerSettings: [.linkedLibrary("dl"), .linkedLibrary("pthread")]
        ),
        .target(
            name: "KmsfsSystem",
            dependencies: ["CSystem"]
        ),
        .target(
            name: "KmsfsCrypto",
            dependencies: ["CLibCrypto", "CSystem", "KmsfsSystem"]
        ),
        .target(
            name: "KmsfsFormat",
            dependencies: ["KmsfsCrypto", "KmsfsSystem"]
        ),
        .target(
            name: "KmsfsKeys",
            dependencies: ["KmsfsCrypto", "KmsfsFormat", "KmsfsSystem", "CSystem", "CCurlBridge"]
        ),
        .target(
            name: "KmsfsFilesystem",
            dependencies: ["KmsfsCrypto", "KmsfsFormat", "KmsfsKeys", "KmsfsSystem", "CFuseBridge", "CSystem"]
        ),
        .executableTarget(
            name: "kmsfs",
            dependencies: [
                "KmsfsCrypto", "KmsfsFormat", "KmsfsKeys", "KmsfsFilesystem", "KmsfsSystem", "CSystem",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(
            name: "KmsfsTests",
            dependencies: ["KmsfsCrypto", "KmsfsFormat", "KmsfsKeys", "KmsfsSystem", "KmsfsFilesystem", "CSystem", "kmsfs"]
        ),
    ]
)
