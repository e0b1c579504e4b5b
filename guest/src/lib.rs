//! waxos guest: the consensus core of a waxos replica, as a WebAssembly component.
//!
//! # Layout
//! - `types`: plain Rust mirrors of the WIT types; the roles never see WIT.
//! - `message`: the versioned wire format of payloads and persisted records.
//! - `acceptor`, `proposer`, `learner`: one module per Paxos role.
//! - `prevote`: a would-be candidate asks first, so a follower that missed heartbeats does not
//!   depose a healthy leader.
//! - `reads`: linearizable reads without a log slot (ReadIndex), at the leader.
//! - `follower_reads`: linearizable reads at a follower, with the leader's read index.
//! - `rejoin`: how a replica that lost its disk earns its vote back (the fence), and ballot
//!   epochs.
//! - `backup`: a replica of a new cluster restored from another cluster's backed-up state.
//! - `kv`: the replicated state machine with exactly-once client sessions.
//! - `replica`: the sans-IO `step(now, events) -> effects` that ties them together (its
//!   `staging` submodule: replaying the WAL, and the staged hot swap).
//! - this file: the WIT glue, compiled for wasm32 only, so everything else runs natively in
//!   tests as well as under wasmtime.
#![deny(missing_docs)]

pub mod acceptor;
pub mod backup;
pub mod follower_reads;
pub mod kv;
pub mod learner;
pub mod membership;
pub mod message;
pub mod prevote;
pub mod proposer;
pub mod reads;
pub mod rejoin;
pub mod replica;
pub mod rng;
pub mod types;

#[cfg(target_arch = "wasm32")]
mod component {
    use std::cell::RefCell;

    use crate::replica::Replica;
    use crate::types;

    #[allow(missing_docs)]
    mod bindings {
        wit_bindgen::generate!({ world: "replica-node-staged", path: "../wit" });
        use super::Component;
        export!(Component);
    }

    use bindings::exports::waxos::replica::replica::{Config, Guest};
    use bindings::exports::waxos::replica::staging::Guest as Staging;
    use bindings::waxos::replica::types as wit;

    thread_local! {
        /// The one replica of this instance; `None` until `start`.
        static REPLICA: RefCell<Option<Replica>> = const { RefCell::new(None) };
    }

    struct Component;

    impl Guest for Component {
        fn start(config: Config, snapshot: Option<Vec<u8>>, wal: Vec<Vec<u8>>) -> Result<Vec<wit::Effect>, String> {
            let config = types::Config {
                me: config.me,
                members: config.members.into_iter().map(member_in).collect(),
                seed: config.seed,
                test_hooks: config.test_hooks,
                retain_slots: config.retain_slots,
                rejoining: config.rejoining,
            };
            let mut replica = Replica::start(config, snapshot.as_deref(), &wal)?;
            let effects = replica.take_effects().into_iter().map(effect_out).collect();
            REPLICA.with(|r| *r.borrow_mut() = Some(replica));
            Ok(effects)
        }

        fn step(now_ms: u64, events: Vec<wit::Event>) -> Vec<wit::Effect> {
            REPLICA.with(|r| match r.borrow_mut().as_mut() {
                Some(replica) => {
                    let events = events.into_iter().map(event_in).collect();
                    replica.step(now_ms, events).into_iter().map(effect_out).collect()
                }
                None => vec![wit::Effect::Log("step before start: ignored".to_string())],
            })
        }

        fn snapshot(handover: bool) -> Vec<u8> {
            REPLICA.with(|r| r.borrow().as_ref().map(|r| r.snapshot(handover)).unwrap_or_default())
        }

        fn status() -> String {
            REPLICA.with(|r| r.borrow().as_ref().map_or_else(|| "{\"started\":false}".to_string(), Replica::status))
        }
    }

    impl Staging for Component {
        fn replay(wal: Vec<Vec<u8>>) -> Result<Vec<wit::Effect>, String> {
            REPLICA.with(|r| match r.borrow_mut().as_mut() {
                Some(replica) => Ok(replica.replay(&wal)?.into_iter().map(effect_out).collect()),
                None => Err("replay before start".to_string()),
            })
        }

        fn handover_volatile() -> Vec<u8> {
            REPLICA.with(|r| r.borrow().as_ref().map(|r| r.handover_volatile()).unwrap_or_default())
        }

        fn adopt(volatile: Vec<u8>) -> Result<Vec<wit::Effect>, String> {
            REPLICA.with(|r| match r.borrow_mut().as_mut() {
                Some(replica) => Ok(replica.adopt(&volatile)?.into_iter().map(effect_out).collect()),
                None => Err("adopt before start".to_string()),
            })
        }
    }

    fn role_in(role: wit::Role) -> types::Role {
        match role {
            wit::Role::Proposer => types::Role::Proposer,
            wit::Role::Acceptor => types::Role::Acceptor,
            wit::Role::Learner => types::Role::Learner,
        }
    }

    fn role_out(role: types::Role) -> wit::Role {
        match role {
            types::Role::Proposer => wit::Role::Proposer,
            types::Role::Acceptor => wit::Role::Acceptor,
            types::Role::Learner => wit::Role::Learner,
        }
    }

    fn event_in(event: wit::Event) -> types::Event {
        match event {
            wit::Event::Request(r) => types::Event::Request(types::Request {
                id: r.id,
                client: r.client,
                seq: r.seq,
                command: match r.command {
                    wit::Command::Put((k, v)) => types::Command::Put(k, v),
                    wit::Command::Get(k) => types::Command::Get(k),
                    wit::Command::Delete(k) => types::Command::Delete(k),
                    wit::Command::GetStale(k) => types::Command::GetStale(k),
                    wit::Command::ChangeMembers(change) => types::Command::ChangeMembers(match change {
                        wit::MemberChange::Add(address) => types::MemberChange::Add { address },
                        wit::MemberChange::Promote(id) => types::MemberChange::Promote(id),
                        wit::MemberChange::Remove(id) => types::MemberChange::Remove(id),
                    }),
                },
            }),
            wit::Event::Message(e) => types::Event::Message(types::Envelope {
                src: e.src,
                dst: e.dst,
                role: role_in(e.role),
                payload: e.payload,
            }),
            wit::Event::Tick => types::Event::Tick,
        }
    }

    fn effect_out(effect: types::Effect) -> wit::Effect {
        match effect {
            types::Effect::Send(e) => {
                wit::Effect::Send(wit::Envelope { src: e.src, dst: e.dst, role: role_out(e.role), payload: e.payload })
            }
            types::Effect::Reply(id, outcome) => wit::Effect::Reply((
                id,
                match outcome {
                    types::Outcome::Value(v) => wit::Outcome::Value(v),
                    types::Outcome::Done => wit::Outcome::Done,
                    types::Outcome::Removed(b) => wit::Outcome::Removed(b),
                    types::Outcome::Redirect(n) => wit::Outcome::Redirect(n),
                    types::Outcome::Rejected(s) => wit::Outcome::Rejected(s),
                    types::Outcome::Member(id) => wit::Outcome::Member(id),
                },
            )),
            types::Effect::Persist(bytes) => wit::Effect::Persist(bytes),
            types::Effect::PersistLazy(bytes) => wit::Effect::PersistLazy(bytes),
            types::Effect::Log(line) => wit::Effect::Log(line),
            types::Effect::Members(members) => wit::Effect::Members(
                members.into_iter().map(|m| wit::Member { id: m.id, address: m.address, voter: m.voter }).collect(),
            ),
        }
    }

    fn member_in(m: wit::Member) -> types::Member {
        types::Member { id: m.id, address: m.address, voter: m.voter }
    }
}
