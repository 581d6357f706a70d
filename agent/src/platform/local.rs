//! A plain host (a laptop, a VM outside AWS): the hostname, nothing to poll,
//! nothing to terminate; idle agents exit only with `exit_when_idle`.

use std::collections::BTreeMap;

use async_trait::async_trait;

use super::{base_labels, Platform, PlatformKind};

pub struct LocalPlatform;

#[async_trait]
impl Platform for LocalPlatform {
    fn kind(&self) -> PlatformKind {
        PlatformKind::Local
    }

    fn labels(&self) -> BTreeMap<String, String> {
        base_labels(PlatformKind::Local)
    }
}
