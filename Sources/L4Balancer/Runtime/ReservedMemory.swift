#if canImport(Glibc)
import Glibc
#endif

/// Zeroed memory for `count` values, reserved rather than touched: fresh anonymous pages
/// read as 0 and become resident only when written. For tables sized for the most a
/// process can have (every slot, every identity) of which little is used.
func reserve<T>(_: T.Type, _ count: Int) -> UnsafeMutablePointer<T> {
    let bytes = max(count * MemoryLayout<T>.stride, 1)
    let raw = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    precondition(raw != nil && raw != MAP_FAILED, "cannot reserve \(bytes) bytes")
    return raw!.bindMemory(to: T.self, capacity: count)
}
