import PoolKit
import Scheduler

/// Version of the swift-realtime-sync toolkit.
public enum RealtimeSyncVersion {
    /// The release string printed by `realtime-sync --version`.
    public static let current = "0.1.0"
}
