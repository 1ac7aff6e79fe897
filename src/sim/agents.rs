//! The simulator's user directory: the agents it knows, how they are given, and lookups.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A Genesys Cloud user as the simulator knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimAgent {
    /// The user id (a UUID, as Genesys Cloud uses).
    pub id: String,
    /// The user's email address; `POST /api/v2/users/search` finds users by it.
    pub email: String,
    /// The display name.
    pub name: String,
    /// Only `active` users can be called for; `deleted` ones are invisible.
    #[serde(default)]
    pub state: AgentState,
}

/// `User.state` in Genesys Cloud.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    /// A working user: searchable and callable.
    #[default]
    Active,
    /// A disabled user: still searchable, but calls for them are refused.
    Inactive,
    /// A removed user: neither searchable nor callable.
    Deleted,
}

impl AgentState {
    /// The wire name, as Genesys Cloud spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Active => "active",
            AgentState::Inactive => "inactive",
            AgentState::Deleted => "deleted",
        }
    }
}

impl SimAgent {
    /// The built-in agents used when none are configured: three active, one inactive and one
    /// deleted, with fixed ids so that scripts and docs can name them.
    pub fn demo_set() -> Vec<SimAgent> {
        let agent = |n: u32, name: &str, state: AgentState| SimAgent {
            id: format!("3f6d2b9e-8c1a-4e57-9b2d-5a7c0e1f00{n:02}"),
            email: format!("agent{n}@example.com"),
            name: name.to_owned(),
            state,
        };
        vec![
            agent(1, "Agent One", AgentState::Active),
            agent(2, "Agent Two", AgentState::Active),
            agent(3, "Agent Three", AgentState::Active),
            agent(4, "Agent Four (inactive)", AgentState::Inactive),
            agent(5, "Agent Five (deleted)", AgentState::Deleted),
        ]
    }
}

/// Parses a JSON array of agents (`DIALER_SIM_AGENTS`), checking what the simulator relies on:
/// UUID ids, no duplicate ids or emails (case-insensitively), no unknown fields.
pub fn parse_agents(json: &str) -> Result<Vec<SimAgent>, String> {
    let agents: Vec<SimAgent> = serde_json::from_str(json).map_err(|e| {
        format!("agents must be a JSON array of {{\"id\", \"email\", \"name\", \"state\"}}: {e}")
    })?;
    // The directory validates and normalises ids, so selfUri and lookups agree whatever UUID
    // spelling was given.
    Ok(Directory::new(agents)?.agents)
}

/// The agents, indexed for the two lookups the API needs.
#[derive(Debug)]
pub(super) struct Directory {
    agents: Vec<SimAgent>,
    by_id: HashMap<Uuid, usize>,
    /// Keyed by the lower-cased email: Genesys matches emails case-insensitively.
    by_email: HashMap<String, usize>,
}

impl Directory {
    /// Validates and indexes the agents; the error names the offending entry.
    pub(super) fn new(agents: Vec<SimAgent>) -> Result<Directory, String> {
        let mut by_id = HashMap::with_capacity(agents.len());
        let mut by_email = HashMap::with_capacity(agents.len());
        let mut normalised = Vec::with_capacity(agents.len());
        for (i, mut agent) in agents.into_iter().enumerate() {
            let id = Uuid::parse_str(&agent.id).map_err(|e| {
                format!(
                    "agent #{} ({}): id {:?} is not a UUID: {e}",
                    i + 1,
                    agent.email,
                    agent.id
                )
            })?;
            let email = agent.email.trim().to_ascii_lowercase();
            if email.is_empty() || !email.contains('@') {
                return Err(format!(
                    "agent #{}: email {:?} is not an email address",
                    i + 1,
                    agent.email
                ));
            }
            if by_id.insert(id, i).is_some() {
                return Err(format!("agent #{}: duplicate id {id}", i + 1));
            }
            if by_email.insert(email, i).is_some() {
                return Err(format!("agent #{}: duplicate email {}", i + 1, agent.email));
            }
            agent.id = id.hyphenated().to_string();
            normalised.push(agent);
        }
        Ok(Directory {
            agents: normalised,
            by_id,
            by_email,
        })
    }

    /// All agents, in the order given.
    pub(super) fn all(&self) -> &[SimAgent] {
        &self.agents
    }

    /// The agent with this id, whatever its state; `None` for anything that is not a known UUID.
    pub(super) fn by_id(&self, id: &str) -> Option<&SimAgent> {
        let id = Uuid::parse_str(id).ok()?;
        self.by_id.get(&id).map(|&i| &self.agents[i])
    }

    /// The agent with this email (case-insensitive), whatever its state.
    pub(super) fn by_email(&self, email: &str) -> Option<&SimAgent> {
        let key = email.trim().to_ascii_lowercase();
        self.by_email.get(&key).map(|&i| &self.agents[i])
    }
}
