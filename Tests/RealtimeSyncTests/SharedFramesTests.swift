import NIOCore
@testable import RealtimeSync
import Testing

/// The fan-out's per-change frame sharing (`SharedFrames`): one buffer per subscription id and
/// event loop, whatever order the clients come in.
@Suite("fan-out: frames shared by subscription id")
struct SharedFramesTests {
    private func quoted(_ id: String) -> [UInt8] { Array("\"\(id)\"".utf8) }

    private func storage(_ buffer: ByteBuffer) -> UnsafeRawPointer? {
        buffer.withUnsafeReadableBytes { UnsafeRawPointer($0.baseAddress) }
    }

    @Test("Clients with the same id on one loop share one buffer, also when other ids come between them")
    func sameIDSharedAcrossInterleaving() {
        var shared = SharedFrames()
        var made = 0
        func frame(_ id: String, loop: Int) -> ByteBuffer {
            shared.frame(quotedID: quoted(id), loop: loop) {
                made += 1
                return ByteBuffer(string: "frame for \(id)")
            }
        }
        let first = frame("orders", loop: 0)
        _ = frame("audit", loop: 0)
        _ = frame("billing", loop: 0)
        let again = frame("orders", loop: 0)
        #expect(made == 3)
        #expect(storage(first) == storage(again))
        #expect(String(buffer: again) == "frame for orders")
    }

    @Test("Another loop gets a copy of the same bytes in a buffer of its own, made without encoding again")
    func otherLoopGetsACopy() {
        var shared = SharedFrames()
        var made = 0
        let make = { () -> ByteBuffer in made += 1; return ByteBuffer(string: "orders frame") }
        let onZero = shared.frame(quotedID: quoted("orders"), loop: 0, make: make)
        let onOne = shared.frame(quotedID: quoted("orders"), loop: 1, make: make)
        let onOneAgain = shared.frame(quotedID: quoted("orders"), loop: 1, make: make)
        let onZeroAgain = shared.frame(quotedID: quoted("orders"), loop: 0, make: make)
        #expect(made == 1)
        #expect(onZero == onOne)
        #expect(storage(onZero) != storage(onOne))
        #expect(storage(onOne) == storage(onOneAgain))
        #expect(storage(onZero) == storage(onZeroAgain))
    }

    @Test("Clients with ids of their own each get their own frame, made once each")
    func distinctIDs() {
        var shared = SharedFrames()
        var made: [String] = []
        for client in 0..<2_000 {
            let id = "user-\(client % 1_000)"
            let frame = shared.frame(quotedID: quoted(id), loop: client % 2) {
                made.append(id)
                return ByteBuffer(string: id)
            }
            #expect(String(buffer: frame) == id)
        }
        // Clients 0-999 make one frame each; 1000-1999 reuse them on the same loop.
        #expect(made.count == 1_000)
        #expect(Set(made).count == 1_000)
    }
}
