/// Reads the server name from a TLS ClientHello without terminating TLS: the bytes a
/// client sent first, which may be cut anywhere (segments arrive one by one) and may span
/// several TLS records. Strict and bounded: anything that is not a well-formed
/// ClientHello is `.invalid`, one larger than `maximumLength` is `.oversize` as soon as
/// its declared length says so, and nothing is allocated.
public enum ClientHello {
    /// The most bytes (records and their headers) a ClientHello may take.
    public static let maximumLength = 16_384

    public enum Verdict: Equatable, Sendable {
        /// Complete: the server name (lowercased, at `offset` with `length` bytes in the
        /// input), or none (`length` 0: no SNI extension).
        case complete(offset: Int, length: Int)
        /// Incomplete: at least this many bytes in all are needed.
        case needMore(Int)
        case invalid
        case oversize
    }

    /// `bytes` is what has arrived so far, from the connection's first byte.
    public static func parse(_ bytes: UnsafeRawBufferPointer) -> Verdict {
        // Pass 1: the records' payloads hold the handshake message; find how long it is
        // and whether all of it is here.
        var recordStart = 0
        var handshakeLength = -1  // the ClientHello's body length, once known
        var gathered = 0  // handshake bytes seen in complete records
        while true {
            guard bytes.count >= recordStart + 5 else { return .needMore(recordStart + 5) }
            guard bytes[recordStart] == 0x16, bytes[recordStart + 1] == 3 else { return .invalid }
            let recordLength = Int(bytes[recordStart + 3]) << 8 | Int(bytes[recordStart + 4])
            guard recordLength > 0, recordLength <= 16_384 else { return .invalid }
            let payload = recordStart + 5
            if handshakeLength < 0 {
                // The handshake header is in the first record's first 4 bytes.
                if bytes.count >= payload + min(4, recordLength), recordLength >= 4 {
                    guard bytes[payload] == 0x01 else { return .invalid }
                    handshakeLength = Int(bytes[payload + 1]) << 16 | Int(bytes[payload + 2]) << 8 | Int(bytes[payload + 3])
                    guard handshakeLength >= 38 else { return .invalid }
                } else if recordLength < 4 {
                    // A header split over records: legal but never sent in practice.
                    return .invalid
                }
            }
            if handshakeLength >= 0 {
                // Records needed at the least: this one's header plus the whole message.
                let least = recordStart + 5 + (handshakeLength + 4 - gathered)
                if least > maximumLength { return .oversize }
            }
            guard bytes.count >= payload + recordLength else { return .needMore(payload + recordLength) }
            gathered += recordLength
            if handshakeLength >= 0, gathered >= handshakeLength + 4 {
                guard gathered == handshakeLength + 4 else { return .invalid }  // trailing bytes in the record
                break
            }
            recordStart = payload + recordLength
        }
        // Pass 2: walk the message across record boundaries.
        var reader = Reader(bytes: bytes)
        reader.skip(4)  // handshake header
        guard reader.skip(2 + 32),  // legacy_version, random
              let sessionID = reader.u8(), sessionID <= 32, reader.skip(Int(sessionID)),
              let suites = reader.u16(), suites >= 2, suites % 2 == 0, reader.skip(Int(suites)),
              let compression = reader.u8(), compression >= 1, reader.skip(Int(compression))
        else { return .invalid }
        let bodyEnd = handshakeLength + 4
        if reader.position == bodyEnd { return .complete(offset: 0, length: 0) }
        guard let extensionsLength = reader.u16(), reader.position + Int(extensionsLength) == bodyEnd else { return .invalid }
        var found: (offset: Int, length: Int)?
        while reader.position < bodyEnd {
            guard let type = reader.u16(), let length = reader.u16(), reader.position + Int(length) <= bodyEnd else { return .invalid }
            let end = reader.position + Int(length)
            if type == 0 {
                // server_name: a list of (type, name); host_name is type 0.
                guard found == nil, let listLength = reader.u16(), reader.position + Int(listLength) == end else { return .invalid }
                while reader.position < end {
                    guard let nameType = reader.u8(), let nameLength = reader.u16(), nameLength > 0,
                          reader.position + Int(nameLength) <= end
                    else { return .invalid }
                    if nameType == 0, found == nil {
                        // The name must be contiguous in the input to be matched in place.
                        guard let offset = reader.contiguous(Int(nameLength)), isHostName(bytes, offset, Int(nameLength)) else { return .invalid }
                        found = (offset, Int(nameLength))
                    } else {
                        guard reader.skip(Int(nameLength)) else { return .invalid }
                    }
                }
            } else {
                guard reader.skip(Int(length)) else { return .invalid }
            }
            guard reader.position == end else { return .invalid }
        }
        guard let found else { return .complete(offset: 0, length: 0) }
        return .complete(offset: found.offset, length: found.length)
    }

    /// Letters, digits, '-', '_' and '.', at most 253 bytes, no empty label.
    static func isHostName(_ bytes: UnsafeRawBufferPointer, _ offset: Int, _ length: Int) -> Bool {
        guard length <= 253 else { return false }
        var previousDot = true
        for i in offset..<(offset + length) {
            let c = bytes[i]
            if c == 0x2E {
                if previousDot { return false }
                previousDot = true
                continue
            }
            previousDot = false
            let ok = (c >= 0x61 && c <= 0x7A) || (c >= 0x41 && c <= 0x5A) || (c >= 0x30 && c <= 0x39) || c == 0x2D || c == 0x5F
            if !ok { return false }
        }
        return !previousDot
    }

    /// Reads the handshake message through its records: `position` counts message bytes
    /// (0 = the handshake header), skipping each record's 5-byte header.
    struct Reader {
        let bytes: UnsafeRawBufferPointer
        var position = 0
        /// Input index of message byte `position`, and where the current record ends.
        var index = 5
        var recordEnd: Int

        init(bytes: UnsafeRawBufferPointer) {
            self.bytes = bytes
            recordEnd = 5 + (Int(bytes[3]) << 8 | Int(bytes[4]))
        }

        mutating func byte() -> UInt8? {
            if index == recordEnd {
                guard recordEnd + 5 <= bytes.count else { return nil }
                let length = Int(bytes[recordEnd + 3]) << 8 | Int(bytes[recordEnd + 4])
                index = recordEnd + 5
                recordEnd = index + length
            }
            guard index < bytes.count, index < recordEnd else { return nil }
            defer {
                index += 1
                position += 1
            }
            return bytes[index]
        }

        mutating func u8() -> UInt8? { byte() }

        mutating func u16() -> UInt16? {
            guard let a = byte(), let b = byte() else { return nil }
            return UInt16(a) << 8 | UInt16(b)
        }

        @discardableResult
        mutating func skip(_ count: Int) -> Bool {
            for _ in 0..<count where byte() == nil { return false }
            return true
        }

        /// The input index of the next `count` message bytes when they lie in one record.
        mutating func contiguous(_ count: Int) -> Int? {
            if index == recordEnd, byte() != nil {
                index -= 1
                position -= 1
            }
            guard index + count <= recordEnd, index + count <= bytes.count else { return nil }
            let start = index
            index += count
            position += count
            return start
        }
    }
}
