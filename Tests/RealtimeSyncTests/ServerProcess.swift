import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// The `realtime-sync` executable run as a child process, as users run it: its output goes to
/// a log file, and the test sends it real signals.
final class ServerProcess: @unchecked Sendable {
    // @unchecked: `pid` and the exit status are written by the one test task that owns the process.
    let pid: pid_t
    let logPath: String
    private var exitStatus: Int32?

    private init(pid: pid_t, logPath: String) {
        self.pid = pid
        self.logPath = logPath
    }

    /// The `realtime-sync` binary that `swift test` built next to the test bundle.
    static func executablePath() throws -> String {
        let me = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")
        let path = (me as NSString).deletingLastPathComponent + "/realtime-sync"
        guard FileManager.default.isExecutableFile(atPath: path) else {
            throw TestClientError("no realtime-sync executable at \(path); build it with `swift build --build-tests`")
        }
        return path
    }

    /// Starts `realtime-sync` with `arguments`; stdout and stderr go to a fresh log file
    /// (stderr to `standardError` instead, if given: `/dev/full` fails every write).
    static func start(_ arguments: [String], environment: [String: String] = [:], standardError: String? = nil) throws -> ServerProcess {
        let path = try executablePath()
        let logPath = NSTemporaryDirectory() + "/realtime-sync-process-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).log"
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, logPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        // "closed-pipe": a pipe whose reading end is closed before the process starts (a log
        // shipper that exited): every write fails with EPIPE, and raises SIGPIPE unless ignored.
        var pipeEnds: [Int32] = [-1, -1]
        defer { for fd in pipeEnds where fd >= 0 { close(fd) } }
        if standardError == "closed-pipe" {
            guard pipe(&pipeEnds) == 0 else { throw TestClientError("pipe: \(String(cString: strerror(errno)))") }
            close(pipeEnds[0])
            pipeEnds[0] = -1
            posix_spawn_file_actions_adddup2(&actions, pipeEnds[1], 2)
        } else if let standardError {
            posix_spawn_file_actions_addopen(&actions, 2, standardError, O_WRONLY, 0)
        } else {
            posix_spawn_file_actions_adddup2(&actions, 1, 2)
        }
        var env = ProcessInfo.processInfo.environment
        for (key, value) in environment { env[key] = value }
        // The child takes its settings from the arguments, not from the test's environment.
        for key in env.keys where key.hasPrefix("REALTIME_SYNC_") || key == "DATABASE_URL" {
            if environment[key] == nil { env[key] = nil }
        }
        let argv = [path] + arguments
        var cargs = argv.map { strdup($0) } + [nil]
        defer { cargs.forEach { free($0) } }
        var cenv = env.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { cenv.forEach { free($0) } }
        // Signals at their default actions, as a shell starts a program (this test process
        // ignores SIGPIPE, and an ignored signal stays ignored across exec).
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var defaults = sigset_t()
        sigemptyset(&defaults)
        sigaddset(&defaults, SIGPIPE)
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGDEF))
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, path, &actions, &attributes, &cargs, &cenv)
        guard rc == 0 else { throw TestClientError("could not start \(path): \(String(cString: strerror(rc)))") }
        return ServerProcess(pid: pid, logPath: logPath)
    }

    /// What the process has written so far.
    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    /// The log's lines at level `error` or `critical` (text log format).
    var errorLines: [Substring] {
        log.split(separator: "\n").filter { $0.contains(" error ") || $0.contains(" critical ") }
    }

    /// Sends `signal` (SIGTERM, SIGINT, SIGKILL).
    func send(_ signal: Int32) { kill(pid, signal) }

    /// The exit status if the process has ended (128 + signal when killed), else nil; reaps it.
    func poll() -> Int32? {
        if let exitStatus { return exitStatus }
        var status: Int32 = 0
        let rc = waitpid(pid, &status, WNOHANG)
        guard rc == pid else { return nil }
        let exited = (status & 0x7f) == 0
        exitStatus = exited ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        return exitStatus
    }

    /// Waits up to `timeout` for the process to end; returns its status, or nil if it still runs.
    func wait(timeout: Duration) async -> Int32? {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if let status = poll() { return status }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return poll()
    }

    /// Waits until `GET /readyz` answers 200 on `port`; throws with the log if the process
    /// ended or `timeout` passed first.
    func waitUntilReady(port: Int, timeout: Duration = .seconds(60)) async throws {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if let status = poll() { throw TestClientError("realtime-sync exited with \(status) before it was ready:\n\(log.suffix(3000))") }
            if let connection = try? await TestConnection.open(port: port) {
                let response = try? await connection.request("GET", "/readyz")
                await connection.close()
                if response?.status == 200 { return }
            }
            try? await Task.sleep(for: .milliseconds(100))
        }
        throw TestClientError("realtime-sync not ready on port \(port) within \(timeout):\n\(log.suffix(3000))")
    }

    /// Kills the process if it still runs, reaps it and removes the log file.
    func cleanUp() async {
        if poll() == nil {
            send(SIGKILL)
            _ = await wait(timeout: .seconds(10))
        }
        unlink(logPath)
    }
}
