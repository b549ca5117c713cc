//! End-to-end tests over real HTTP on loopback against a real PostgreSQL
//! (one fresh database per test).

mod alerts;
mod attach;
mod flood;
mod fuzz;
mod helpers;
mod hostile;
mod logs;
mod ops;
mod overload;
mod pipeline;
mod playback;
mod pooler;
mod private_cluster;
mod process;
mod reservations;
mod sip_links;
mod supabase;
mod telnyx_spec;
mod testing;
mod webhook;
mod worker;
