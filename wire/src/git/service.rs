//! The git services a client may ask for, by their wire names.

/// A git service a client may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    UploadPack,
    ReceivePack,
    UploadArchive,
}

impl Service {
    /// From the wire name, e.g. `git-upload-pack`.
    pub fn from_wire(name: &str) -> Option<Self> {
        match name {
            "git-upload-pack" => Some(Self::UploadPack),
            "git-receive-pack" => Some(Self::ReceivePack),
            "git-upload-archive" => Some(Self::UploadArchive),
            _ => None,
        }
    }

    pub fn wire_name(self) -> &'static str {
        match self {
            Self::UploadPack => "git-upload-pack",
            Self::ReceivePack => "git-receive-pack",
            Self::UploadArchive => "git-upload-archive",
        }
    }

    /// The `git` subcommand that serves it.
    pub fn subcommand(self) -> &'static str {
        match self {
            Self::UploadPack => "upload-pack",
            Self::ReceivePack => "receive-pack",
            Self::UploadArchive => "upload-archive",
        }
    }

    /// Whether the service changes the repository.
    pub fn writes(self) -> bool {
        self == Self::ReceivePack
    }
}
