//! The certificates of terminated HTTPS services, as served now: loaded with the configuration,
//! read again when their files change (cert-manager renews into a mounted Secret by swapping a
//! symlink; the relay's own ACME orders write into its store), picked by the server name a client
//! asks for (exact names first, then wildcards).
//!
//! A file that turns bad (half written, a key that is not the certificate's) keeps the last good
//! certificate in service; the status page and the log say why.
//!
//! - [`store`]: the certificates held and their files looked at; the resolver for rustls.
//! - [`acme`]: the orders of certificates the relay gets by ACME.
//! - [`challenges`]: the answers to ACME challenges in progress, which the listeners give.

pub(crate) mod acme;
pub(crate) mod challenges;
mod store;

pub(crate) use store::{Resolver, Store};
