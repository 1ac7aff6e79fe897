//! The Genesys Cloud regions (from the official SDKs' region host table) and how
//! `GENESYS_ENVIRONMENT` resolves to an API and a login base URL.

use url::Url;

/// One Genesys Cloud region: its name and its domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// Region name as AWS spells it, e.g. `us-east-1`.
    pub name: &'static str,
    /// Domain; the API is at `api.<domain>`, the token endpoint at `login.<domain>`.
    pub domain: &'static str,
}

/// All 18 regions of SDK 269 (`purecloud_region_hosts.py`).
pub const REGIONS: [Region; 18] = [
    Region {
        name: "us-east-1",
        domain: "mypurecloud.com",
    },
    Region {
        name: "eu-west-1",
        domain: "mypurecloud.ie",
    },
    Region {
        name: "ap-southeast-2",
        domain: "mypurecloud.com.au",
    },
    Region {
        name: "ap-northeast-1",
        domain: "mypurecloud.jp",
    },
    Region {
        name: "eu-central-1",
        domain: "mypurecloud.de",
    },
    Region {
        name: "us-west-2",
        domain: "usw2.pure.cloud",
    },
    Region {
        name: "ca-central-1",
        domain: "cac1.pure.cloud",
    },
    Region {
        name: "ap-northeast-2",
        domain: "apne2.pure.cloud",
    },
    Region {
        name: "eu-west-2",
        domain: "euw2.pure.cloud",
    },
    Region {
        name: "ap-south-1",
        domain: "aps1.pure.cloud",
    },
    Region {
        name: "us-east-2",
        domain: "use2.us-gov-pure.cloud",
    },
    Region {
        name: "sa-east-1",
        domain: "sae1.pure.cloud",
    },
    Region {
        name: "me-central-1",
        domain: "mec1.pure.cloud",
    },
    Region {
        name: "ap-northeast-3",
        domain: "apne3.pure.cloud",
    },
    Region {
        name: "eu-central-2",
        domain: "euc2.pure.cloud",
    },
    Region {
        name: "mx-central-1",
        domain: "mxc1.pure.cloud",
    },
    Region {
        name: "ap-southeast-1",
        domain: "apse1.pure.cloud",
    },
    Region {
        name: "eusc-de-east-1",
        domain: "edee1.eusc-pure.cloud",
    },
];

/// Resolves a region name (`us-east-1`, `us_east_1`) or a bare domain (`mypurecloud.com`,
/// also `api.mypurecloud.com`) to the API and login base URLs.
pub fn resolve_environment(raw: &str) -> Result<(Url, Url), String> {
    let value = raw.trim().to_ascii_lowercase();
    let as_region = value.replace('_', "-");
    let domain = if let Some(region) = REGIONS.iter().find(|r| r.name == as_region) {
        region.domain.to_owned()
    } else if looks_like_domain(&value) {
        // People paste the API or login host; both mean the same environment.
        value
            .strip_prefix("api.")
            .or_else(|| value.strip_prefix("login."))
            .unwrap_or(&value)
            .to_owned()
    } else {
        return Err(format!(
            "{raw:?} is neither a region nor a domain; expected a region ({} …) or a domain such as mypurecloud.com",
            REGIONS[..4]
                .iter()
                .map(|r| r.name)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    };
    let url = |host: String| {
        Url::parse(&format!("https://{host}"))
            .map_err(|e| format!("{raw:?} does not make a valid host ({e})"))
    };
    Ok((
        url(format!("api.{domain}"))?,
        url(format!("login.{domain}"))?,
    ))
}

fn looks_like_domain(value: &str) -> bool {
    value.contains('.')
        && !value.starts_with('.')
        && !value.ends_with('.')
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_region_resolves_to_api_and_login_hosts() {
        for region in REGIONS {
            let (api, login) = resolve_environment(region.name).unwrap();
            assert_eq!(api.host_str().unwrap(), format!("api.{}", region.domain));
            assert_eq!(
                login.host_str().unwrap(),
                format!("login.{}", region.domain)
            );
            assert_eq!(api.scheme(), "https");
        }
        let names: std::collections::HashSet<_> = REGIONS.iter().map(|r| r.name).collect();
        assert_eq!(names.len(), 18);
    }

    #[test]
    fn known_hosts_from_the_sdk_table() {
        let cases = [
            (
                "eu-west-1",
                "https://api.mypurecloud.ie/",
                "https://login.mypurecloud.ie/",
            ),
            (
                "US_EAST_2",
                "https://api.use2.us-gov-pure.cloud/",
                "https://login.use2.us-gov-pure.cloud/",
            ),
            (
                "eusc-de-east-1",
                "https://api.edee1.eusc-pure.cloud/",
                "https://login.edee1.eusc-pure.cloud/",
            ),
            (
                "mypurecloud.com",
                "https://api.mypurecloud.com/",
                "https://login.mypurecloud.com/",
            ),
            (
                "api.euw2.pure.cloud",
                "https://api.euw2.pure.cloud/",
                "https://login.euw2.pure.cloud/",
            ),
            (
                "login.mypurecloud.de",
                "https://api.mypurecloud.de/",
                "https://login.mypurecloud.de/",
            ),
        ];
        for (input, api, login) in cases {
            let (a, l) = resolve_environment(input).unwrap();
            assert_eq!((a.as_str(), l.as_str()), (api, login), "{input}");
        }
    }

    #[test]
    fn nonsense_is_refused() {
        for bad in [
            "mars-1",
            "",
            "my purecloud.com",
            "https://api.mypurecloud.com",
            ".com",
        ] {
            assert!(resolve_environment(bad).is_err(), "{bad}");
        }
    }
}
