internal import CBPF

#if canImport(Glibc)
import Glibc
#endif

/// The bpffs directory maps and links are pinned in. `/sys/fs/bpf` is mounted when it is
/// not already a bpffs (a fresh container or mount namespace).
enum BPFFileSystem {
    static let mountPoint = "/sys/fs/bpf"

    static func prepare(_ pinPath: String) throws(BPFError) {
        if pinPath.hasPrefix(mountPoint + "/"), !isBPFFS(mountPoint) {
            mkdir(mountPoint, 0o755)
            guard mount("bpf", mountPoint, "bpf", 0, nil) == 0 else {
                throw BPFError("mounting bpffs on \(mountPoint)", code: errno)
            }
        }
        var path = ""
        for component in pinPath.split(separator: "/") {
            path += "/" + component
            if mkdir(path, 0o700) != 0, errno != EEXIST {
                throw BPFError("creating \(path)", code: errno)
            }
        }
        guard isBPFFS(pinPath) else {
            throw BPFError("\(pinPath) is not on a bpf filesystem", code: ENOTSUP)
        }
    }

    static func isBPFFS(_ path: String) -> Bool {
        var fs = statfs()
        return statfs(path, &fs) == 0 && UInt(bitPattern: Int(fs.f_type)) == UInt(L4LB_BPF_FS_MAGIC)
    }
}
