import Foundation
import Synchronization
import CLibPQ
#if canImport(Glibc)
import Glibc
#endif

/// A throwaway PostgreSQL cluster for tests, demos and local runs.
///
/// `start()` runs `initdb` into a fresh temporary folder and starts the server with
/// `pg_ctl` on a free loopback port, with `wal_level=logical` and room for replication slots and
/// WAL senders. When the process runs as root the server runs as the `postgres` user (PostgreSQL
/// refuses to run as root). `stop()` stops the server and removes the folder; it is idempotent
/// and also runs when the process exits normally. A cluster left behind by a process that was
/// killed is removed by the next `start()` on the machine.
///
/// ```swift
/// let pg = try await EmbeddedPostgres.start()
/// let conn = try await PostgresConnection.connect(to: pg.url)
/// ```
public final class EmbeddedPostgres: Sendable {
    /// How to start the cluster.
    public struct Options: Sendable {
        /// Extra `name=value` server settings, added after the defaults.
        public var settings: [String: String]
        /// The folder under which the cluster's temporary folder is made. Default: the system's
        /// temporary directory.
        public var parentDirectory: String
        /// The longest `initdb` may run (then it is killed), and the longest `pg_ctl start` may
        /// wait for the server to accept connections. Default 60 s.
        public var startTimeout: Duration
        /// The longest `stop()` waits for a fast shutdown (`pg_ctl stop -m fast`) before it kills
        /// the server and its children (SIGKILL). Default 30 s.
        public var stopTimeout: Duration

        /// Creates options.
        public init(settings: [String: String] = [:], parentDirectory: String = NSTemporaryDirectory(),
                    startTimeout: Duration = .seconds(60), stopTimeout: Duration = .seconds(30)) {
            self.settings = settings
            self.parentDirectory = parentDirectory
            self.startTimeout = startTimeout
            self.stopTimeout = stopTimeout
        }
    }

    /// A `postgres://` URL for the superuser `postgres`, database `postgres`, over TCP on
    /// 127.0.0.1, with the cluster's random password (TCP logins need it, so that another local
    /// user cannot log in as superuser; the Unix socket in `directory`, reachable only by this
    /// process's user, needs none). Log `redactedURL` instead.
    public let url: String
    /// `url` with the password replaced by `***`, for logs.
    public var redactedURL: String {
        guard let at = url.firstIndex(of: "@"), let colon = url[..<at].lastIndex(of: ":"),
              url[..<colon].hasSuffix("//postgres") else { return url }
        return String(url[...colon]) + "***" + String(url[at...])
    }
    /// The TCP port the server listens on (127.0.0.1 only).
    public let port: Int
    /// The cluster's temporary folder (data, socket and log).
    public let directory: String
    /// The folder holding `initdb`, `pg_ctl` and `postgres`.
    public let binDirectory: String

    private let runAsUser: String?
    /// `pg_ctl stop`'s `-t`, whole seconds (`Options.stopTimeout`).
    private let stopWait: Int
    private let stopped = Mutex(false)
    /// This end of the watchdog's socket pair and the watchdog's pid (see `spawnWatchdog`).
    private let watchdog: (fd: Int32, pid: pid_t)?
    /// `owner.lock`, held (flock) for the cluster's life: see `holdOwnerLock`.
    private let ownerLock: Int32

    private init(url: String, port: Int, directory: String, binDirectory: String, runAsUser: String?,
                 stopWait: Int, ownerLock: Int32, watchdog: (fd: Int32, pid: pid_t)? = nil) {
        self.ownerLock = ownerLock
        self.url = url
        self.port = port
        self.directory = directory
        self.binDirectory = binDirectory
        self.runAsUser = runAsUser
        self.stopWait = stopWait
        self.watchdog = watchdog
    }

    /// Whole seconds for `pg_ctl`'s `-t`, rounded up so that a sub-second timeout is not 0.
    static func wholeSeconds(_ d: Duration) -> Int {
        max(1, Int((Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18).rounded(.up)))
    }

    /// The data folder inside `directory`.
    public var dataDirectory: String { directory + "/data" }

    /// Starts a new cluster. Blocking steps (initdb, pg_ctl) run off the Swift concurrency pool.
    public static func start(_ options: Options = Options()) async throws -> EmbeddedPostgres {
        try await withCheckedThrowingContinuation { cont in
            // A serial queue of its own: its thread is not taken from the width-limited global pool.
            DispatchQueue(label: "EmbeddedPostgres.start").async {
                do { cont.resume(returning: try startBlocking(options)) } catch { cont.resume(throwing: error) }
            }
        }
    }

    /// Starts a new cluster, blocking the calling thread; use from synchronous code only.
    public static func startBlocking(_ options: Options = Options()) throws -> EmbeddedPostgres {
        let bin = try findBinDirectory()
        reapOrphans(parent: options.parentDirectory)
        let asRoot = geteuid() == 0
        let user: String? = asRoot ? "postgres" : nil
        if asRoot, userIDs("postgres") == nil {
            throw EmbeddedPostgresError(code: .noPostgresUser, message: "running as root, but there is no 'postgres' user to run the server as (PostgreSQL refuses to run as root): install postgresql, which creates it")
        }
        var template = Array((options.parentDirectory.hasSuffix("/") ? options.parentDirectory : options.parentDirectory + "/").utf8CString.dropLast())
        template += Array("realtime-sync-pg-XXXXXX".utf8CString)
        // mkdtemp fills in the template itself; its result points into the array only while
        // the call lasts, so the name is read from the array.
        guard mkdtemp(&template) != nil else {
            throw EmbeddedPostgresError(code: .system, message: "could not create a temporary folder under \(options.parentDirectory): \(String(cString: strerror(errno))) (choose another folder with EmbeddedPostgres.Options.parentDirectory, or TMPDIR; as root it must be reachable by the postgres user)")
        }
        let dir = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        // Record who owns this cluster so a later start can reap it if this process dies: the
        // lock first (a reaper never sees a pid without it), then the pid for older reapers.
        let ownerLock = holdOwnerLock(in: dir)
        try? "\(getpid())".write(toFile: dir + "/owner.pid", atomically: true, encoding: .utf8)
        if let user, let ids = userIDs(user) {
            chown(dir, ids.uid, ids.gid)
            chmod(dir, 0o700)
        }
        let dataDirectory = dir + "/data"
        let stopWait = wholeSeconds(options.stopTimeout)
        func tool(_ name: String, _ args: [String], timeout: Duration? = nil) throws {
            _ = try run(bin + "/" + name, args, as: user, timeout: timeout.map { ($0, "EmbeddedPostgres.Options.startTimeout") })
        }
        func giveUp(_ error: any Error) -> any Error {
            // The same cleanup as stop(): a server that did start is stopped, the folder removed.
            EmbeddedPostgres(url: "", port: 0, directory: dir, binDirectory: bin, runAsUser: user, stopWait: stopWait, ownerLock: ownerLock).stop()
            return error
        }
        // TCP logins need this password: the server listens on 127.0.0.1, which every local
        // user can reach, and a superuser login reads files and runs programs as `postgres`.
        // The Unix socket (in the 0700 folder) stays password-free for this process's user.
        let password = (0..<4).map { _ in String(UInt64.random(in: 0...UInt64.max), radix: 16) }.joined()
        let passwordFile = dir + "/pwfile"
        do {
            guard FileManager.default.createFile(atPath: passwordFile, contents: Data((password + "\n").utf8),
                                                 attributes: [.posixPermissions: 0o600]) else {
                throw EmbeddedPostgresError(code: .system, message: "could not write \(passwordFile) (Options.parentDirectory: a writable folder; or set TMPDIR)")
            }
            if let user, let ids = userIDs(user) { chown(passwordFile, ids.uid, ids.gid) }
            defer { unlink(passwordFile) }
            try tool("initdb", ["-D", dataDirectory, "-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256",
                                "--pwfile=" + passwordFile, "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"],
                     timeout: options.startTimeout)
            var settings: [(String, String)] = [
                ("listen_addresses", "'127.0.0.1'"),
                ("unix_socket_directories", "'\(dir)'"),
                ("wal_level", "logical"), ("max_replication_slots", "40"), ("max_wal_senders", "40"),
                ("max_connections", "300"), ("fsync", "off"), ("full_page_writes", "off"),
                ("shared_buffers", "128MB"), ("log_min_messages", "warning"),
            ]
            for (k, v) in options.settings.sorted(by: { $0.key < $1.key }) { settings.append((k, v)) }
            try appendSettings(settings, to: dataDirectory + "/postgresql.conf")
        } catch {
            throw giveUp(error)
        }
        let wait = wholeSeconds(options.startTimeout)
        // The port is free when chosen but may be taken before the server binds it (another
        // process, or a parallel test): try again on a new one, a few times.
        var attempt = 0
        while true {
            attempt += 1
            let port: Int
            do {
                port = try freePort()
                // A later line of postgresql.conf wins: each attempt appends its port.
                try appendSettings([("port", "\(port)")], to: dataDirectory + "/postgresql.conf")
                try tool("pg_ctl", ["-D", dataDirectory, "-l", dir + "/server.log", "-w", "-t", "\(wait)", "start"])
            } catch {
                let log = (try? String(contentsOfFile: dir + "/server.log", encoding: .utf8)) ?? ""
                let portTaken = log.contains("could not bind") || log.contains("Address already in use")
                if portTaken && attempt < 3 {
                    try? FileManager.default.removeItem(atPath: dir + "/server.log")
                    continue
                }
                var message = "the server did not start"
                if case let e as EmbeddedPostgresError = error, e.message.contains("did not start in time") || e.message.contains("timed out") {
                    message += " within \(wait) s (EmbeddedPostgres.Options.startTimeout)"
                }
                message += log.isEmpty ? ": \(error)" : "; server.log ends with:\n\(log.suffix(2000))"
                throw giveUp(EmbeddedPostgresError(code: .startFailed, message: message))
            }
            let pg = EmbeddedPostgres(url: "postgres://postgres:\(password)@127.0.0.1:\(port)/postgres?sslmode=disable",
                                      port: port, directory: dir, binDirectory: bin, runAsUser: user, stopWait: stopWait,
                                      ownerLock: ownerLock, watchdog: spawnWatchdog(directory: dir, pgCtl: bin + "/pg_ctl", user: user))
            EmbeddedRegistry.shared.add(pg)
            return pg
        }
    }

    /// Appends `name = value` lines to a `postgresql.conf`.
    private static func appendSettings(_ settings: [(String, String)], to path: String) throws {
        let text = settings.map { "\($0.0) = \($0.1)" }.joined(separator: "\n") + "\n"
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        defer { try? handle.close() }
        try handle.seekToEnd()
        try handle.write(contentsOf: Data(text.utf8))
    }

    /// Stops the server (fast shutdown) and removes the folder. Idempotent; blocking while the
    /// server exits. A server that has not stopped within `Options.stopTimeout` is killed with
    /// its children (backends and auxiliary processes), which are waited for.
    public func stop() {
        let already = stopped.withLock { s -> Bool in
            defer { s = true }
            return s
        }
        guard !already else { return }
        EmbeddedRegistry.shared.remove(self)
        // Held before it is asked to stop, so that its pid, once free, is never signalled.
        let server = Postmaster.open(dataDirectory: dataDirectory)
        var stoppedInTime = true
        if FileManager.default.fileExists(atPath: dataDirectory + "/postmaster.pid") {
            do {
                try runTool("pg_ctl", ["-D", dataDirectory, "-m", "fast", "-w", "-t", "\(stopWait)", "stop"])
            } catch {
                stoppedInTime = false
            }
        }
        if let server {
            // pg_ctl returns once postmaster.pid is gone, which the server removes after its
            // children exited; wait (bounded) for the process itself.
            if !stoppedInTime || !waitUntil(milliseconds: 5000, server.hasExited) {
                let children = server.kill()
                _ = waitUntil(milliseconds: 5000, server.hasExited)
                _ = waitUntil(milliseconds: 5000) { !children.contains(where: processIsAlive) }
            }
            server.close()
        }
        if let watchdog {
            // Stood down first: a line on the socket (not its end) means "nothing to do", so it
            // exits at once and never races this removal. Reaped, so that no zombie is left.
            _ = "done\n".withCString { send(watchdog.fd, $0, 5, Int32(MSG_NOSIGNAL)) }
            close(watchdog.fd)
            var status: Int32 = 0
            while waitpid(watchdog.pid, &status, 0) < 0 && errno == EINTR {}
        }
        try? FileManager.default.removeItem(atPath: directory)
        if ownerLock >= 0 { close(ownerLock) }
    }

    /// Opens `directory/owner.lock` and takes an exclusive `flock` on it, held until `stop()`
    /// closes it (the kernel drops it when this process ends, however it ends). A reaper that
    /// can take the lock knows the owner is gone, whatever its pid now names (pids are reused:
    /// in a container the owner is often pid 1 every time). -1 if it could not be made.
    ///
    /// The file is made and locked under another name, then renamed: a reaper never sees an
    /// `owner.lock` that is not locked yet (it would take the owner for gone).
    static func holdOwnerLock(in directory: String) -> Int32 {
        let temporary = directory + "/owner.lock.\(getpid()).\(UInt32.random(in: 0...UInt32.max))"
        let fd = Glibc.open(temporary, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else { return -1 }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0, rename(temporary, directory + "/owner.lock") == 0 else {
            close(fd)
            unlink(temporary)
            return -1
        }
        return fd
    }

    /// Whether the process that made the cluster folder `directory` has ended: its
    /// `owner.lock` can be locked (then the lock is held until the returned descriptor is
    /// closed), or, for a folder without one, its `owner.pid` names no running process.
    static func ownerIsGone(_ directory: String) -> (gone: Bool, lock: Int32) {
        let fd = Glibc.open(directory + "/owner.lock", O_RDWR | O_CLOEXEC | O_NOFOLLOW)
        if fd >= 0 {
            if flock(fd, LOCK_EX | LOCK_NB) == 0 { return (true, fd) }
            close(fd)
            return (false, -1)
        }
        guard errno == ENOENT, let text = try? String(contentsOfFile: directory + "/owner.pid", encoding: .utf8),
              let owner = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)) else { return (false, -1) }
        return (!processIsAlive(owner), -1)
    }

    /// Starts a process that stops the cluster and removes its folder when this process dies
    /// without `stop()` (SIGKILL, a crash, a closed terminal: `atexit` does not run then, and
    /// the server, which `pg_ctl` put in a session of its own, would run on). It reads a
    /// socket whose other end only this process holds (close-on-exec): the kernel closes it
    /// when this process ends, however it ends. In a session of its own, so that the signals of
    /// this process's terminal do not end it first. Nil if it could not be started (the
    /// cluster then relies on `stop()` and the next start's orphan cleanup, as before).
    private static func spawnWatchdog(directory: String, pgCtl: String, user: String?) -> (fd: Int32, pid: pid_t)? {
        // A socket pair rather than a pipe: `stop()` writes to it with MSG_NOSIGNAL, so a
        // watchdog that died meanwhile cannot kill this process with SIGPIPE.
        var pair: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else { return nil }
        // Both ends above the standard descriptors (a process started with 0-2 closed would
        // get them there, and its output would then reach the watchdog), still close-on-exec.
        let fds = pair.map { fd -> Int32 in
            let moved = fcntl(fd, F_DUPFD_CLOEXEC, 3)
            close(fd)
            return moved
        }
        guard fds.allSatisfy({ $0 >= 3 }) else {
            fds.filter { $0 >= 0 }.forEach { close($0) }
            return nil
        }
        // A line ("done", from stop()) means stand down; the end of the socket means this process
        // died: stop the server (as `postgres` when root) and remove the folder.
        // The folder goes only once the server stopped (a server still running must keep it,
        // or it could never be found again; the next start's cleanup takes a stale one).
        let script = #"if read _; then exit 0; fi; if [ -n "$3" ]; then "$4" -u "$3" -- "$1" -D "$2/data" -m immediate -w -t 10 stop; else "$1" -D "$2/data" -m immediate -w -t 10 stop; fi && rm -rf "$2""#
        let runuser = findExecutable("runuser", path: "/usr/sbin:/usr/bin:/sbin:/bin") ?? "/usr/sbin/runuser"
        let argv = ["/bin/sh", "-c", script, "realtime-sync-pg-watchdog", pgCtl, directory, user ?? "", runuser]
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, fds[0], 0)
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0)
        posix_spawn_file_actions_addchdir_np(&actions, "/")
        posix_spawn_file_actions_addclosefrom_np(&actions, 3)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var noSignals = sigset_t()
        sigemptyset(&noSignals)
        posix_spawnattr_setsigmask(&attributes, &noSignals)
        posix_spawnattr_setflags(&attributes, Int16(CLIBPQ_POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK))
        var cargs = argv.map { strdup($0) } + [nil]
        defer { cargs.forEach { free($0) } }
        var pid: pid_t = 0
        var environment = minimalEnvironment()
        defer { environment.forEach { free($0) } }
        let rc = posix_spawn(&pid, argv[0], &actions, &attributes, &cargs, &environment)
        close(fds[0])
        guard rc == 0 else {
            close(fds[1])
            return nil
        }
        return (fds[1], pid)
    }

    /// The environment of the tools and server this starts: a `PATH`, the C locale and the
    /// time zone, not this process's whole environment (its secrets would be readable through
    /// the server, e.g. `pg_read_file('/proc/self/environ')`, and libpq variables such as
    /// `PGOPTIONS` would change the server's tools).
    static func minimalEnvironment() -> [UnsafeMutablePointer<CChar>?] {
        let environment = ProcessInfo.processInfo.environment
        var entries = ["PATH=" + (environment["PATH"] ?? "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL=C", "LANG=C"]
        if let zone = environment["TZ"] { entries.append("TZ=" + zone) }
        return entries.map { strdup($0) } + [nil]
    }

    /// Stops the server and removes the folder without blocking a Swift concurrency thread.
    public func shutdown() async {
        await withCheckedContinuation { (cont: CheckedContinuation<Void, Never>) in
            DispatchQueue(label: "EmbeddedPostgres.stop").async {
                self.stop()
                cont.resume()
            }
        }
    }

    /// Restarts the server on the same port and data (for tests of reconnect behaviour).
    /// It keeps the port, so that clients reconnect to the same `url`: if another process took
    /// the port meanwhile, this throws, quoting the end of `server.log`.
    public func restart() throws {
        try startTool(["-m", "fast", "restart"])
    }

    /// Stops the server but keeps the data, so that `startAgain()` can bring it back.
    public func stopServer() throws {
        try runTool("pg_ctl", ["-D", dataDirectory, "-m", "fast", "-w", "-t", "\(stopWait)", "stop"])
    }

    /// Starts a server stopped with `stopServer()`, on the same port (see `restart()`).
    public func startAgain() throws {
        try startTool(["start"])
    }

    /// `pg_ctl start` or `restart`; a failure quotes the end of `server.log`, where the server
    /// says why (pg_ctl's own output only says to look there).
    private func startTool(_ args: [String]) throws {
        let log = directory + "/server.log"
        let before = (try? FileManager.default.attributesOfItem(atPath: log)[.size] as? Int) ?? 0
        do {
            try runTool("pg_ctl", ["-D", dataDirectory, "-l", log, "-w", "-t", "60"] + args)
        } catch let error as EmbeddedPostgresError {
            let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
            let new = text.utf8.count > before ? String(decoding: text.utf8.dropFirst(before), as: UTF8.self) : ""
            guard !new.isEmpty else { throw error }
            throw EmbeddedPostgresError(code: error.code, message: error.message + "; server.log ends with:\n" + new.suffix(2000))
        }
    }

    /// The postmaster's process ID, when the server is running.
    public var serverPID: Int32? {
        Self.postmasterPID(in: dataDirectory)
    }

    /// The pid on the first line of `dataDirectory/postmaster.pid`, if the file is there.
    static func postmasterPID(in dataDirectory: String) -> Int32? {
        guard let text = try? String(contentsOfFile: dataDirectory + "/postmaster.pid", encoding: .utf8),
              let first = text.split(separator: "\n").first else { return nil }
        return Int32(first)
    }

    @discardableResult
    private func runTool(_ tool: String, _ args: [String]) throws -> String {
        try Self.run(binDirectory + "/" + tool, args, as: runAsUser)
    }

    /// Runs a tool to completion with its output in a file. Uses `posix_spawn` + `waitpid`, not
    /// Foundation's `Process`: on Linux, `Process` learns of the child's exit through a socket the
    /// child inherits, and the server that `pg_ctl start` leaves running would inherit it too, so
    /// `waitUntilExit()` would never return. With `timeout` (a limit and the knob that sets it),
    /// the tool runs in a process group of its own, and one still running at the limit is killed
    /// with its children (SIGKILL to the group) and reported naming the knob: a hung `initdb`
    /// (a full or stalled disk, a locked-up NFS folder) held `start()` for good.
    static func run(_ path: String, _ args: [String], as user: String?, timeout: (limit: Duration, knob: String)? = nil) throws -> String {
        var argv: [String]
        if let user {
            argv = [findExecutable("runuser", path: "/usr/sbin:/usr/bin:/sbin:/bin") ?? "/usr/sbin/runuser", "-u", user, "--", path] + args
        } else {
            argv = [path] + args
        }
        let outPath = NSTemporaryDirectory() + "/realtime-sync-pgtool-\(getpid())-\(UInt64.random(in: 0...UInt64.max)).log"
        defer { unlink(outPath) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, outPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        posix_spawn_file_actions_addchdir_np(&actions, "/")
        // Nothing of ours (sockets, pipes) may leak into the long-lived server.
        posix_spawn_file_actions_addclosefrom_np(&actions, 3)
        var cargs = argv.map { strdup($0) } + [nil]
        defer { cargs.forEach { free($0) } }
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        if timeout != nil {
            posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETPGROUP))
            posix_spawnattr_setpgroup(&attributes, 0)
        }
        var pid: pid_t = 0
        var environment = minimalEnvironment()
        defer { environment.forEach { free($0) } }
        let rc = posix_spawn(&pid, argv[0], &actions, &attributes, &cargs, &environment)
        guard rc == 0 else {
            throw EmbeddedPostgresError(code: .toolFailed, message: "could not run \(argv[0]): \(String(cString: strerror(rc)))")
        }
        var status: Int32 = 0
        if let timeout {
            let deadline = ContinuousClock.now + timeout.limit
            while true {
                let reaped = waitpid(pid, &status, WNOHANG)
                if reaped == pid || (reaped < 0 && errno != EINTR) { break }
                if ContinuousClock.now >= deadline {
                    kill(-pid, SIGKILL)
                    // A process in uninterruptible I/O (the stalled disk that hung it) dies only
                    // when that I/O returns: reaped if it goes within 5 s, else left to init.
                    let reapBy = ContinuousClock.now + .seconds(5)
                    while ContinuousClock.now < reapBy {
                        let gone = waitpid(pid, &status, WNOHANG)
                        if gone == pid || (gone < 0 && errno != EINTR) { break }
                        usleep(10_000)
                    }
                    let text = (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? ""
                    throw EmbeddedPostgresError(code: .toolFailed, message: "\((path as NSString).lastPathComponent) did not finish within \(timeout.limit) (\(timeout.knob)) and was killed\(text.isEmpty ? "" : "; its output ends with: \(text.suffix(2000))")")
                }
                usleep(10_000)
            }
        } else {
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        }
        let text = (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? ""
        let exited = (status & 0x7f) == 0
        let code = exited ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        guard code == 0 else {
            throw EmbeddedPostgresError(code: .toolFailed, message: "\((path as NSString).lastPathComponent) \(args.joined(separator: " ")) failed (exit \(code)): \(text.suffix(2000))")
        }
        return text
    }

    static func findExecutable(_ name: String, path: String? = nil) -> String? {
        let path = path ?? ProcessInfo.processInfo.environment["PATH"] ?? "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        for dir in path.split(separator: ":") {
            let candidate = "\(dir)/\(name)"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return nil
    }

    /// Finds the folder with `initdb`, `pg_ctl` and `postgres`: PATH first (resolving links),
    /// then the newest `/usr/lib/postgresql/*/bin`.
    static func findBinDirectory(path: String? = nil, versionsRoot: String = "/usr/lib/postgresql") throws -> String {
        func complete(_ dir: String) -> Bool {
            ["initdb", "pg_ctl", "postgres"].allSatisfy { FileManager.default.isExecutableFile(atPath: dir + "/" + $0) }
        }
        if let initdb = findExecutable("initdb", path: path) {
            let resolved = (try? FileManager.default.destinationOfSymbolicLink(atPath: initdb)) ?? initdb
            let full = resolved.hasPrefix("/") ? resolved : ((initdb as NSString).deletingLastPathComponent + "/" + resolved)
            let dir = (full as NSString).deletingLastPathComponent
            if complete(dir) { return dir }
        }
        let root = versionsRoot
        let versions = ((try? FileManager.default.contentsOfDirectory(atPath: root)) ?? [])
            .compactMap { v -> (Int, String)? in Int(v).map { ($0, v) } }
            .sorted { $0.0 > $1.0 }
        for (_, v) in versions where complete("\(root)/\(v)/bin") { return "\(root)/\(v)/bin" }
        throw EmbeddedPostgresError(code: .binariesNotFound, message: "PostgreSQL server binaries not found: install postgresql (looked for initdb, pg_ctl and postgres on PATH and in /usr/lib/postgresql/*/bin)")
    }

    /// A TCP port on 127.0.0.1 that nothing listens on at the moment of the call.
    public static func freePort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw EmbeddedPostgresError(code: .system, message: "socket() failed: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = 0
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard rc == 0 else { throw EmbeddedPostgresError(code: .system, message: "could not find a free port: \(String(cString: strerror(errno)))") }
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        return Int(UInt16(bigEndian: addr.sin_port))
    }

    /// Stops and removes clusters whose owning process is gone (left by a killed test run).
    static func reapOrphans(parent: String) {
        guard let entries = try? FileManager.default.contentsOfDirectory(atPath: parent) else { return }
        let user: String? = geteuid() == 0 ? "postgres" : nil
        // Only folders this process's user (or, as root, `postgres`) made, and no symbolic
        // links: in a shared /tmp another user could plant one pointing at a cluster of theirs.
        var owners: Set<uid_t> = [geteuid()]
        if let user, let ids = userIDs(user) { owners.insert(ids.uid) }
        for name in entries where name.hasPrefix("realtime-sync-pg-") {
            let dir = (parent as NSString).appendingPathComponent(name)
            guard owned(dir, S_IFDIR, by: owners) else { continue }
            let (gone, lock) = ownerIsGone(dir)
            guard gone else { continue }
            defer { if lock >= 0 { close(lock) } }
            if FileManager.default.fileExists(atPath: dir + "/data/postmaster.pid") {
                guard owned(dir + "/data", S_IFDIR, by: owners) else { continue }
                // Only a postmaster shown to be this folder's is signalled (not `pg_ctl stop`,
                // which signals whatever pid a stale postmaster.pid names: after a reboot, that
                // may be another server, or any process). SIGQUIT is an immediate shutdown.
                if let server = Postmaster.open(dataDirectory: dir + "/data") {
                    server.signal(SIGQUIT)
                    if !waitUntil(milliseconds: 10_000, server.hasExited) {
                        // Still running: its folder stays, or it could never be found again.
                        server.close()
                        continue
                    }
                    server.close()
                }
                // A server that died with its owner left a stale file: it goes.
            }
            try? FileManager.default.removeItem(atPath: dir)
        }
        // The output files of tools whose process was killed while they ran.
        let tmp = NSTemporaryDirectory()
        for name in (try? FileManager.default.contentsOfDirectory(atPath: tmp)) ?? [] where name.hasPrefix("realtime-sync-pgtool-") {
            let parts = name.split(separator: "-")
            guard parts.count >= 4, let pid = Int32(parts[3]), !processIsAlive(pid) else { continue }
            let path = (tmp as NSString).appendingPathComponent(name)
            if owned(path, S_IFREG, by: owners) { unlink(path) }
        }
    }

    /// The user and group IDs of user `name`, or nil. `getpwnam_r`: `getpwnam` returns one
    /// static record that another thread's call (a parallel start) may overwrite meanwhile.
    static func userIDs(_ name: String) -> (uid: uid_t, gid: gid_t)? {
        var record = passwd()
        var result: UnsafeMutablePointer<passwd>?
        var size = max(1024, sysconf(Int32(_SC_GETPW_R_SIZE_MAX)))
        while size <= 1 << 20 {
            var buffer = [CChar](repeating: 0, count: size)
            let rc = getpwnam_r(name, &record, &buffer, buffer.count, &result)
            if rc == ERANGE { size *= 2; continue }  // a long entry (directory services): a larger buffer
            guard rc == 0, result != nil else { return nil }
            return (record.pw_uid, record.pw_gid)
        }
        return nil
    }

    /// Whether `path` is itself (not through a symbolic link) of file type `type` (`S_IFDIR`,
    /// `S_IFREG`) and owned by one of `owners`.
    private static func owned(_ path: String, _ type: mode_t, by owners: Set<uid_t>) -> Bool {
        var info = stat()
        return lstat(path, &info) == 0 && (info.st_mode & S_IFMT) == type && owners.contains(info.st_uid)
    }
}

/// A cluster's postmaster, held by a pidfd where the kernel has them (Linux 5.3+): a process
/// whose exit can be awaited and which can be killed without ever signalling another process
/// that got its pid afterwards.
struct Postmaster {
    let pid: Int32
    /// The pidfd, or -1 where `pidfd_open` is missing (the pid is then checked each time).
    let fd: Int32

    /// The process named in `dataDirectory/postmaster.pid`, if it runs and is that folder's
    /// postmaster: its working directory is the folder, or, where that cannot be read (root
    /// without CAP_SYS_PTRACE, the default in containers, may not read another user's
    /// `/proc/<pid>/cwd`), its command line is `postgres … -D <folder>`. A stale file's pid
    /// reused by another process fails this. Nil otherwise.
    static func open(dataDirectory: String) -> Postmaster? {
        guard let pid = EmbeddedPostgres.postmasterPID(in: dataDirectory), pid > 0 else { return nil }
        let fd = clibpq_pidfd_open(pid)
        if fd < 0 && errno != ENOSYS { return nil }  // ESRCH: gone already
        // Checked after the pidfd is held: the process checked is the one the pidfd names.
        let folder = URL(fileURLWithPath: dataDirectory).resolvingSymlinksInPath().path
        guard processIsAlive(pid), isPostmaster(pid, of: dataDirectory, resolved: folder) else {
            if fd >= 0 { Glibc.close(fd) }
            return nil
        }
        return Postmaster(pid: pid, fd: fd)
    }

    /// See `open(dataDirectory:)`.
    static func isPostmaster(_ pid: Int32, of dataDirectory: String, resolved folder: String) -> Bool {
        if let cwd = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/cwd"), !cwd.isEmpty {
            return URL(fileURLWithPath: cwd).resolvingSymlinksInPath().path == folder
        }
        return commandLineNames(pid, dataDirectory, resolved: folder)
    }

    /// Whether process `pid`'s command line is `postgres … -D <dataDirectory>` (`pg_ctl start`
    /// runs it so; the postmaster keeps its arguments). Readable by every user.
    static func commandLineNames(_ pid: Int32, _ dataDirectory: String, resolved folder: String) -> Bool {
        guard let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return false }
        let arguments = data.split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
        guard let program = arguments.first, program == "postgres" || program.hasSuffix("/postgres"),
              let flag = arguments.firstIndex(of: "-D"), flag + 1 < arguments.count else { return false }
        let named = arguments[flag + 1]
        return named == dataDirectory || URL(fileURLWithPath: named).resolvingSymlinksInPath().path == folder
    }

    /// True once the process has exited (a zombie counts as exited).
    func hasExited() -> Bool {
        guard fd >= 0 else { return !processIsAlive(pid) }
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        return poll(&p, 1, 0) > 0
    }

    /// Kills the postmaster and its children (SIGKILL) and returns the children's pids. The
    /// postmaster is stopped first (SIGSTOP), so that it starts no child meanwhile and the pids
    /// of its children, exited or not, stay theirs (an exited child is a zombie it has not
    /// reaped); each child leads a process group of its own, which is killed with it.
    /// Nothing if the postmaster has exited already: its pid may be another's by now.
    func kill() -> [Int32] {
        guard !hasExited() else { return [] }
        send(SIGSTOP)
        let children = childProcesses(of: pid)
        for child in children {
            if getpgid(child) == child { killpg(child, SIGKILL) } else { Glibc.kill(child, SIGKILL) }
        }
        send(SIGKILL)
        return children
    }

    /// Sends `signal` to the postmaster (through its pidfd where there is one).
    func signal(_ signal: Int32) { send(signal) }

    private func send(_ signal: Int32) {
        if fd >= 0 { _ = clibpq_pidfd_send_signal(fd, signal) } else if !hasExited() { Glibc.kill(pid, signal) }
    }

    /// Closes the pidfd.
    func close() {
        if fd >= 0 { Glibc.close(fd) }
    }
}

/// Checks `condition` every 10 ms for up to `milliseconds`; true once it holds.
func waitUntil(milliseconds: Int, _ condition: () -> Bool) -> Bool {
    var waited = 0
    while !condition() {
        if waited >= milliseconds { return false }
        usleep(10_000)
        waited += 10
    }
    return true
}

/// The live (not zombie) children of `parent`, from `/proc`.
func childProcesses(of parent: Int32) -> [Int32] {
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
    return entries.compactMap { name -> Int32? in
        guard let pid = Int32(name),
              let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return nil }
        // After the command: state, ppid.
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        guard fields.count > 1, fields[0] != "Z", fields[0] != "X", Int32(fields[1]) == parent else { return nil }
        return pid
    }
}

/// True when `pid` names a running process (a zombie, which a container's init may never reap,
/// counts as gone).
func processIsAlive(_ pid: Int32) -> Bool {
    guard kill(pid, 0) == 0 || errno == EPERM else { return false }
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
          let close = stat.lastIndex(of: ")") else { return true }
    let state = stat[stat.index(after: close)...].split(separator: " ").first
    return state != "Z" && state != "X"
}

/// A failure to find, start or stop the embedded cluster.
public struct EmbeddedPostgresError: Error, Sendable, CustomStringConvertible {
    /// Stable error codes, for programs.
    public enum Code: String, Sendable, Hashable {
        /// Running as root with no `postgres` user to run the server as.
        case noPostgresUser = "EMBEDDED_PG_NO_POSTGRES_USER"
        /// `initdb`, `pg_ctl` or `postgres` were not found.
        case binariesNotFound = "EMBEDDED_PG_BINARIES_NOT_FOUND"
        /// A folder, socket or free port could not be had from the system.
        case system = "EMBEDDED_PG_SYSTEM"
        /// A tool (`initdb`, `pg_ctl`) failed.
        case toolFailed = "EMBEDDED_PG_TOOL_FAILED"
        /// The server did not start (the message quotes its log).
        case startFailed = "EMBEDDED_PG_START_FAILED"
    }
    /// The stable code.
    public var code: Code
    /// What went wrong and what to do.
    public var message: String
    /// `EmbeddedPostgres EMBEDDED_PG_…: message` (the code is searchable in logs).
    public var description: String { "EmbeddedPostgres \(code.rawValue): \(message)" }
}

/// Every running embedded cluster, stopped at process exit.
final class EmbeddedRegistry: Sendable {
    static let shared = EmbeddedRegistry()
    private let clusters = Mutex<[ObjectIdentifier: EmbeddedPostgres]>([:])

    private init() {
        atexit {
            EmbeddedRegistry.shared.stopAll()
        }
    }

    func add(_ pg: EmbeddedPostgres) { clusters.withLock { $0[ObjectIdentifier(pg)] = pg } }
    func remove(_ pg: EmbeddedPostgres) { clusters.withLock { _ = $0.removeValue(forKey: ObjectIdentifier(pg)) } }

    func stopAll() {
        let all = clusters.withLock { c -> [EmbeddedPostgres] in
            defer { c.removeAll() }
            return Array(c.values)
        }
        for pg in all { pg.stop() }
    }
}
