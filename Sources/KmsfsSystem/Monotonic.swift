import Glibc

/// The monotonic clock (never jumps with the wall clock).
public enum Monotonic {
    /// Seconds since an arbitrary fixed point.
    public static func seconds() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1_000_000_000
    }
}

/// The clock that keeps counting while the machine (or VM) is suspended: for deadlines that must hold in
/// real time, such as a lease.
public enum BootClock {
    public static func seconds() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_BOOTTIME, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1_000_000_000
    }
}
