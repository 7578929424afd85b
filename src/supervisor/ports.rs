//! The worker port pool.
//!
//! A port is handed out only when no instance of ours holds it (running *or* still exiting)
//! and nothing else on the machine listens on it. Allocation walks the range round-robin, so
//! a port just released is the last to be reused.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::ops::RangeInclusive;

#[derive(Debug)]
pub struct PortPool {
    range: RangeInclusive<u16>,
    next: u16,
    held: HashSet<u16>,
}

impl PortPool {
    pub fn new(range: RangeInclusive<u16>) -> PortPool {
        PortPool {
            next: *range.start(),
            range,
            held: HashSet::new(),
        }
    }

    /// Changes the range (reload); ports held outside it stay held until released.
    pub fn set_range(&mut self, range: RangeInclusive<u16>) {
        if !range.contains(&self.next) {
            self.next = *range.start();
        }
        self.range = range;
    }

    /// Reserves a free port. With `bind`, returns the listening socket (bound by tqproxy and
    /// handed to the instance as fd 3), which also closes the window in which another process
    /// could take the port.
    pub fn allocate(&mut self, bind: bool) -> Option<(u16, Option<TcpListener>)> {
        let len = (*self.range.end() as u32) - (*self.range.start() as u32) + 1;
        for _ in 0..len {
            let port = self.next;
            self.next = if port >= *self.range.end() {
                *self.range.start()
            } else {
                port + 1
            };
            if self.held.contains(&port) {
                continue;
            }
            // std sets SO_REUSEADDR, like the workers will: TIME_WAIT leftovers do not block,
            // a listener does.
            match TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))) {
                Ok(l) => {
                    self.held.insert(port);
                    return Some((port, if bind { Some(l) } else { None }));
                }
                Err(_) => continue,
            }
        }
        None
    }

    /// Returns a port once its instance (and every process of it) has exited.
    pub fn release(&mut self, port: u16) {
        self.held.remove(&port);
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_range() -> RangeInclusive<u16> {
        // A range unlikely to be used by other tests running in parallel.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        drop(l);
        let start = p.saturating_sub(3).max(1024);
        start..=start + 3
    }

    #[test]
    fn never_hands_out_a_held_or_busy_port() {
        let range = free_range();
        let mut pool = PortPool::new(range.clone());
        let (a, _) = pool.allocate(false).unwrap();
        let (b, _) = pool.allocate(false).unwrap();
        assert_ne!(a, b);
        // something else listens on the next candidate
        let mut taken = Vec::new();
        for p in range.clone() {
            if p != a
                && p != b
                && let Ok(l) = TcpListener::bind(("127.0.0.1", p))
            {
                taken.push(l);
            }
        }
        assert!(
            pool.allocate(false).is_none(),
            "only busy or held ports are left"
        );
        pool.release(a);
        assert_eq!(pool.allocate(false).unwrap().0, a);
        assert_eq!(pool.held(), 2);
    }

    #[test]
    fn bind_returns_the_listener() {
        let mut pool = PortPool::new(free_range());
        let (port, l) = pool.allocate(true).unwrap();
        let l = l.expect("listener");
        assert_eq!(l.local_addr().unwrap().port(), port);
    }
}
