/// A number parsed from its decimal text (Postgres's output of int2/int4/int8,
/// float4/float8 and numeric, or a filter operand), compared exactly, with no
/// rounding, however many digits it has.
///
/// Order follows Postgres's sort order for float and numeric: `-Infinity` <
/// every finite value < `Infinity` < `NaN`, and `NaN` equals `NaN`; `-0` equals `0`.
struct DecimalNumber: Sendable, Hashable, Comparable {
    enum Kind: Int, Sendable, Hashable {
        case negativeInfinity = 0, finite = 1, positiveInfinity = 2, nan = 3
    }

    var kind: Kind
    /// For finite values: true when below zero (never true for zero).
    var negative: Bool
    /// Significant digits (0...9 each), no leading or trailing zeros; empty for zero.
    var digits: [UInt8]
    /// The value is `0.d1d2d3… × 10^exponent` (0 for zero).
    var exponent: Int

    /// Parses `[+-]digits[.digits][e[+-]digits]` (also `.5`, `5.`) or, case-insensitively,
    /// `NaN`, `Infinity`, `inf` with an optional sign. Nil for anything else.
    init?(text: some Collection<UInt8>) {
        var bytes = text[...]
        guard let first = bytes.first else { return nil }
        var negative = false
        if first == UInt8(ascii: "-") || first == UInt8(ascii: "+") {
            negative = first == UInt8(ascii: "-")
            bytes = bytes.dropFirst()
        }
        if let special = Self.special(bytes) {
            if special == .nan && bytes.count != text.count { return nil }  // no sign on NaN
            self.kind = special == .positiveInfinity && negative ? .negativeInfinity : special
            self.negative = false
            self.digits = []
            self.exponent = 0
            return
        }
        var digits: [UInt8] = []
        var integerDigits = 0  // digits before the point, leading zeros excluded
        var leadingFractionZeros = 0  // zeros after the point before the first significant digit
        var seenPoint = false
        var seenDigit = false
        var index = bytes.startIndex
        while index != bytes.endIndex {
            let byte = bytes[index]
            if byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9") {
                seenDigit = true
                let digit = byte - UInt8(ascii: "0")
                if digits.isEmpty && digit == 0 {
                    if seenPoint { leadingFractionZeros += 1 }
                } else {
                    digits.append(digit)
                    if !seenPoint { integerDigits += 1 }
                }
            } else if byte == UInt8(ascii: ".") && !seenPoint {
                seenPoint = true
            } else {
                break
            }
            index = bytes.index(after: index)
        }
        guard seenDigit else { return nil }
        var exponent = 0
        if index != bytes.endIndex {
            guard bytes[index] == UInt8(ascii: "e") || bytes[index] == UInt8(ascii: "E") else { return nil }
            index = bytes.index(after: index)
            var exponentNegative = false
            if index != bytes.endIndex, bytes[index] == UInt8(ascii: "-") || bytes[index] == UInt8(ascii: "+") {
                exponentNegative = bytes[index] == UInt8(ascii: "-")
                index = bytes.index(after: index)
            }
            var sawExponentDigit = false
            while index != bytes.endIndex {
                let byte = bytes[index]
                guard byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9") else { return nil }
                sawExponentDigit = true
                // Saturate: far beyond any real exponent, still exact in its order.
                if exponent < 1_000_000_000_000 { exponent = exponent * 10 + Int(byte - UInt8(ascii: "0")) }
                index = bytes.index(after: index)
            }
            guard sawExponentDigit else { return nil }
            if exponentNegative { exponent = -exponent }
        }
        while let last = digits.last, last == 0 { digits.removeLast() }
        self.kind = .finite
        self.digits = digits
        self.negative = negative && !digits.isEmpty
        self.exponent = digits.isEmpty ? 0 : (integerDigits > 0 ? integerDigits : -leadingFractionZeros) + exponent
    }

    private static func special(_ bytes: some Collection<UInt8>) -> Kind? {
        func equalsIgnoringCase(_ word: String) -> Bool {
            bytes.count == word.utf8.count && zip(bytes, word.utf8).allSatisfy { ($0 | 0x20) == $1 }
        }
        if equalsIgnoringCase("nan") { return .nan }
        if equalsIgnoringCase("infinity") || equalsIgnoringCase("inf") { return .positiveInfinity }
        return nil
    }

    /// The canonical text: equal numbers give equal text (used as an index key).
    var canonicalText: String {
        switch kind {
        case .nan: return "NaN"
        case .positiveInfinity: return "Infinity"
        case .negativeInfinity: return "-Infinity"
        case .finite:
            if digits.isEmpty { return "0" }
            var text = negative ? "-0." : "0."
            for digit in digits { text.unicodeScalars.append(Unicode.Scalar(UInt8(ascii: "0") + digit)) }
            return text + "e" + String(exponent)
        }
    }

    static func == (lhs: DecimalNumber, rhs: DecimalNumber) -> Bool {
        lhs.kind == rhs.kind && (lhs.kind != .finite
            || (lhs.negative == rhs.negative && lhs.exponent == rhs.exponent && lhs.digits == rhs.digits))
    }

    func hash(into hasher: inout Hasher) {
        hasher.combine(kind)
        if kind == .finite {
            hasher.combine(negative)
            hasher.combine(exponent)
            hasher.combine(digits)
        }
    }

    static func < (lhs: DecimalNumber, rhs: DecimalNumber) -> Bool {
        if lhs.kind != rhs.kind { return lhs.kind.rawValue < rhs.kind.rawValue }
        guard lhs.kind == .finite else { return false }
        if lhs.negative != rhs.negative { return lhs.negative }
        let magnitudeLess = Self.magnitudeLess(lhs, rhs)
        if lhs.negative { return !magnitudeLess && lhs != rhs }
        return magnitudeLess
    }

    /// |lhs| < |rhs| for finite values.
    private static func magnitudeLess(_ lhs: DecimalNumber, _ rhs: DecimalNumber) -> Bool {
        if lhs.digits.isEmpty || rhs.digits.isEmpty { return lhs.digits.isEmpty && !rhs.digits.isEmpty }
        if lhs.exponent != rhs.exponent { return lhs.exponent < rhs.exponent }
        return lhs.digits.lexicographicallyPrecedes(rhs.digits)
    }
}

/// Parses a plain decimal integer (`-?[0-9]+`, as Postgres prints int2/int4/int8)
/// into an Int64 without allocating; nil when it is not one or does not fit.
@inline(__always)
func parseInt64(_ bytes: some Collection<UInt8>) -> Int64? {
    var index = bytes.startIndex
    guard index != bytes.endIndex else { return nil }
    var negative = false
    if bytes[index] == UInt8(ascii: "-") || bytes[index] == UInt8(ascii: "+") {
        negative = bytes[index] == UInt8(ascii: "-")
        index = bytes.index(after: index)
        guard index != bytes.endIndex else { return nil }
    }
    var value: Int64 = 0
    while index != bytes.endIndex {
        let byte = bytes[index]
        guard byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9") else { return nil }
        let digit = Int64(byte - UInt8(ascii: "0"))
        // Accumulate negatively so that Int64.min fits.
        let (times10, overflow1) = value.multipliedReportingOverflow(by: 10)
        let (next, overflow2) = times10.subtractingReportingOverflow(digit)
        guard !overflow1, !overflow2 else { return nil }
        value = next
        index = bytes.index(after: index)
    }
    if negative { return value }
    let (positive, overflow) = Int64(0).subtractingReportingOverflow(value)
    return overflow ? nil : positive
}
