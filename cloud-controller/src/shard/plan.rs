//! What one replica does with the shard Leases in one round, as a pure function of what it
//! sees: which shards it keeps renewing, which free ones it takes, which it gives up.
//!
//! The rule is a fair share: with `S` shards and `M` live replicas, nobody holds more than
//! `ceil(S / M)`. A replica above it releases its surplus, the shards it prefers least (so a
//! replica that joins finds free shards in the next round). Free shards are dealt out to the
//! replicas below their share, each shard to the one that wants it most (rendezvous hashing:
//! highest weight of replica and shard), and every replica deals the same way from what it
//! sees: replicas looking at once take different shards rather than racing for the same
//! ones, and a shard tends to return to the same replica after a restart. Should views
//! differ, two replicas taking one shard cannot both win: every Lease update carries its
//! resourceVersion.

use std::collections::BTreeSet;

use super::fnv1a;

/// One round's view, from one replica.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    /// This replica's identity.
    pub me: &'a str,
    /// The live replicas (this one included).
    pub members: &'a BTreeSet<String>,
    /// Each shard's live holder (`None`: free, released or expired).
    pub holders: &'a [Option<String>],
}

/// What to do with the shard Leases this round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Shards held and kept: renew their Leases.
    pub renew: Vec<u32>,
    /// Free shards to take.
    pub acquire: Vec<u32>,
    /// Shards held beyond the fair share: release their Leases.
    pub release: Vec<u32>,
}

/// The most shards one replica holds: `ceil(shards / members)`.
pub fn fair_share(shards: usize, members: usize) -> usize {
    shards.div_ceil(members.max(1))
}

/// How much `replica` wants `shard` (rendezvous hashing: highest first).
pub fn weight(replica: &str, shard: u32) -> u64 {
    fnv1a(&[replica.as_bytes(), b"/", &shard.to_be_bytes()])
}

/// This round's plan for `view.me`.
pub fn plan(view: View<'_>) -> Plan {
    let mut members: Vec<&str> = view.members.iter().map(String::as_str).collect();
    if !view.members.contains(view.me) {
        members.push(view.me);
    }
    let fair = fair_share(view.holders.len(), members.len());
    let by_preference = |shards: &mut Vec<u32>| {
        shards.sort_by_key(|s| std::cmp::Reverse((weight(view.me, *s), *s)));
    };
    let mut held: Vec<u32> = (0..view.holders.len() as u32)
        .filter(|s| view.holders[*s as usize].as_deref() == Some(view.me))
        .collect();
    by_preference(&mut held);
    let release = if held.len() > fair {
        held.split_off(fair)
    } else {
        Vec::new()
    };
    let mut plan = Plan {
        renew: held,
        acquire: share_free(&view, &members, fair),
        release,
    };
    plan.renew.sort_unstable();
    plan.acquire.sort_unstable();
    plan.release.sort_unstable();
    plan
}

/// The free shards `view.me` takes: every replica deals the free shards out the same way
/// from the same view (each, in order, to the replica below its share that wants it most),
/// so replicas that look at once take different shards instead of racing for the same ones.
/// Every free shard is dealt: the members' room below their shares is at least the number
/// of free shards, because `members * fair >= shards`.
fn share_free(view: &View<'_>, members: &[&str], fair: usize) -> Vec<u32> {
    let mut room: Vec<(&str, usize)> = members
        .iter()
        .map(|m| {
            let held = view
                .holders
                .iter()
                .filter(|h| h.as_deref() == Some(*m))
                .count();
            (*m, fair.saturating_sub(held))
        })
        .collect();
    let mut mine = Vec::new();
    for shard in (0..view.holders.len() as u32).filter(|s| view.holders[*s as usize].is_none()) {
        let Some(taker) = room
            .iter_mut()
            .filter(|(_, r)| *r > 0)
            .max_by_key(|(m, _)| (weight(m, shard), *m))
        else {
            break;
        };
        taker.1 -= 1;
        if taker.0 == view.me {
            mine.push(shard);
        }
    }
    mine
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn members(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn a_lone_replica_takes_every_shard() {
        let holders = vec![None; 8];
        let p = plan(View {
            me: "a",
            members: &members(&["a"]),
            holders: &holders,
        });
        assert_eq!(p.acquire, (0..8).collect::<Vec<_>>());
        assert!(p.renew.is_empty() && p.release.is_empty());
    }

    #[test]
    fn a_replica_above_its_share_releases_the_surplus_it_wants_least() {
        let holders = vec![Some("a".to_owned()); 8];
        let m = members(&["a", "b"]);
        let p = plan(View {
            me: "a",
            members: &m,
            holders: &holders,
        });
        assert_eq!((p.renew.len(), p.release.len()), (4, 4));
        assert!(p.acquire.is_empty());
        let lowest_kept = p.renew.iter().map(|s| weight("a", *s)).min().unwrap();
        assert!(p.release.iter().all(|s| weight("a", *s) < lowest_kept));
        // The newcomer sees nothing free yet, and waits.
        assert_eq!(
            plan(View {
                me: "b",
                members: &m,
                holders: &holders
            }),
            Plan::default()
        );
    }

    #[test]
    fn a_replica_not_yet_listed_counts_itself() {
        let holders = vec![None; 4];
        let p = plan(View {
            me: "b",
            members: &members(&["a"]),
            holders: &holders,
        });
        assert_eq!(p.acquire.len(), 2);
    }

    /// One replica's writes, applied as the API server would: a take succeeds only while the
    /// shard is still free (the resourceVersion it read is still current).
    fn apply(holders: &mut [Option<String>], me: &str, p: &Plan) {
        for s in &p.release {
            if holders[*s as usize].as_deref() == Some(me) {
                holders[*s as usize] = None;
            }
        }
        for s in &p.acquire {
            if holders[*s as usize].is_none() {
                holders[*s as usize] = Some(me.to_owned());
            }
        }
    }

    /// Rounds in which every member plans on the same snapshot, then writes in `order`.
    fn rounds(holders: &mut [Option<String>], m: &BTreeSet<String>, order: &[usize], n: usize) {
        let names: Vec<&String> = m.iter().collect();
        for _ in 0..n {
            let snapshot = holders.to_vec();
            let plans: Vec<(String, Plan)> = names
                .iter()
                .map(|me| {
                    let p = plan(View {
                        me,
                        members: m,
                        holders: &snapshot,
                    });
                    ((*me).clone(), p)
                })
                .collect();
            for i in order.iter().map(|i| i % plans.len()) {
                apply(holders, &plans[i].0, &plans[i].1);
            }
            // Writes of replicas not in `order` land last.
            for (me, p) in &plans {
                apply(holders, me, p);
            }
        }
    }

    fn settled(holders: &[Option<String>], m: &BTreeSet<String>) -> Result<(), String> {
        let fair = fair_share(holders.len(), m.len());
        for (s, h) in holders.iter().enumerate() {
            match h {
                Some(h) if m.contains(h) => {}
                other => return Err(format!("shard {s} held by {other:?}")),
            }
        }
        for r in m {
            let n = holders.iter().filter(|h| h.as_deref() == Some(r)).count();
            if n > fair {
                return Err(format!("{r} holds {n} > {fair}"));
            }
        }
        Ok(())
    }

    proptest! {
        /// From any holders (some of them gone replicas, whose Leases expire), members that
        /// plan and write in any order settle within three rounds: every shard held by exactly
        /// one live member, none above its fair share; and a member joining or leaving
        /// settles again within three rounds.
        #[test]
        fn any_start_and_any_membership_change_settle_within_three_rounds(
            shards in 1usize..96,
            n_members in 1usize..6,
            start in proptest::collection::vec(proptest::option::of(0usize..8), 96),
            order in proptest::collection::vec(0usize..6, 0..12),
            join in any::<bool>(),
        ) {
            let names = ["r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7"];
            let mut m: BTreeSet<String> =
                names[..n_members].iter().map(|n| (*n).to_owned()).collect();
            // Leases of replicas that are not members have expired: seen as free.
            let mut holders: Vec<Option<String>> = start[..shards]
                .iter()
                .map(|h| h.map(|i| names[i].to_owned()).filter(|h| m.contains(h)))
                .collect();
            rounds(&mut holders, &m, &order, 3);
            prop_assert_eq!(settled(&holders, &m), Ok(()));

            if join {
                m.insert("r7".to_owned());
            } else if m.len() > 1 {
                let gone = m.iter().next_back().cloned().unwrap();
                m.remove(&gone);
                for h in &mut holders {
                    if h.as_deref() == Some(gone.as_str()) {
                        *h = None;
                    }
                }
            }
            rounds(&mut holders, &m, &order, 3);
            prop_assert_eq!(settled(&holders, &m), Ok(()));
        }
    }
}
