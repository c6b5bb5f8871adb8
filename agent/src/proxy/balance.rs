//! Load balancing among the endpoints of the chosen version.

use std::net::SocketAddr;

use crate::state::Endpoint;

/// Power of two choices on in-flight requests: cheap, and it steers away from slow pods.
/// `not` excludes the endpoint a retry must avoid.
pub fn pick(endpoints: &[Endpoint], not: Option<SocketAddr>) -> Option<&Endpoint> {
    let allowed = |e: &&Endpoint| Some(e.address) != not;
    let n = endpoints.iter().filter(allowed).count();
    let nth = |i| endpoints.iter().filter(allowed).nth(i);
    match n {
        0 => None,
        1 => nth(0),
        n => {
            let a = nth(fastrand::usize(..n))?;
            let b = nth(fastrand::usize(..n))?;
            Some(if b.in_flight() < a.in_flight() { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two idle endpoints and their addresses.
    fn two_endpoints() -> ([Endpoint; 2], SocketAddr, SocketAddr) {
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
        ([Endpoint::new(a), Endpoint::new(b)], a, b)
    }

    #[test]
    fn power_of_two_choices_steers_away_from_a_busy_endpoint() {
        let (endpoints, a, _) = two_endpoints();
        let picks_of_a = |endpoints: &[Endpoint]| {
            (0..4000)
                .filter(|_| pick(endpoints, None).unwrap().address == a)
                .count()
        };
        // Equal load: either, about evenly.
        let even = picks_of_a(&endpoints);
        assert!((1700..2300).contains(&even), "{even} of 4000");
        // `a` busy: chosen only when both draws land on it, one time in four.
        let _busy: Vec<_> = (0..5).map(|_| endpoints[0].start()).collect();
        let busy = picks_of_a(&endpoints);
        assert!((800..1200).contains(&busy), "{busy} of 4000");
    }

    #[test]
    fn a_retry_never_picks_the_endpoint_that_failed() {
        let (endpoints, a, b) = two_endpoints();
        for _ in 0..100 {
            assert_eq!(pick(&endpoints, Some(a)).unwrap().address, b);
        }
        assert!(pick(&endpoints[..1], Some(a)).is_none());
        assert!(pick(&[], None).is_none());
    }
}
