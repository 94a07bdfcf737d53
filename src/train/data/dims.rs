//! The 90 AlignX preference dimensions (AlignX's order), each with two poles.
//!
//! A pole's `label` is what descriptions say ("The user prefers concise answers"); its
//! `phrases` are what synthetic responses and user posts say. Every label and phrase is
//! unique across all 180 poles, so any of them identifies exactly one pole.

/// One end of a preference dimension.
#[derive(Debug)]
pub struct Pole {
    pub label: &'static str,
    pub phrases: &'static [&'static str],
}

/// A preference dimension; `pos` is AlignX's "Positive" direction (higher levels preferred).
#[derive(Debug)]
pub struct Dim {
    pub index: usize,
    /// "trait" or "topic".
    pub group: &'static str,
    pub name: &'static str,
    pub pos: Pole,
    pub neg: Pole,
}

macro_rules! dim {
    ($i:expr, $name:literal, $pl:literal, [$($pp:literal),+], $nl:literal, [$($np:literal),+]) => {
        Dim {
            index: $i,
            group: "trait",
            name: $name,
            pos: Pole { label: $pl, phrases: &[$($pp),+] },
            neg: Pole { label: $nl, phrases: &[$($np),+] },
        }
    };
}

/// Topic dimensions: the negative pole is "no <kw> talk" with formulaic paraphrases;
/// `$about` is the form that reads well after "nothing about" (defaults to `$kw`).
macro_rules! topic {
    ($i:expr, $name:literal, $pl:literal, [$($pp:literal),+], $kw:literal) => {
        topic!($i, $name, $pl, [$($pp),+], $kw, $kw)
    };
    ($i:expr, $name:literal, $pl:literal, [$($pp:literal),+], $kw:literal, $about:literal) => {
        Dim {
            index: $i,
            group: "topic",
            name: $name,
            pos: Pole { label: $pl, phrases: &[$($pp),+] },
            neg: Pole {
                label: concat!("no ", $kw, " talk"),
                phrases: &[
                    concat!("nothing about ", $about),
                    concat!("no ", $kw, " stuff"),
                    concat!("zero ", $kw, " chatter"),
                ],
            },
        }
    };
}

static DIMS: [Dim; 90] = [
    dim!(
        0,
        "Age group",
        "youthful tone",
        ["a young vibe", "fresh slang", "a teen feel"],
        "mature tone",
        ["a grown-up voice", "seasoned wisdom", "an older outlook"]
    ),
    dim!(
        1,
        "Gender",
        "male viewpoint",
        ["a guy's take", "men's advice", "a brotherly view"],
        "female viewpoint",
        ["a woman's take", "women's advice", "a sisterly view"]
    ),
    dim!(
        2,
        "Neuroticism",
        "anxious caution",
        ["extra worry", "nervous double checks", "worst case plans"],
        "calm composure",
        ["a relaxed mood", "steady nerves", "no stress at all"]
    ),
    dim!(
        3,
        "Extraversion",
        "social outings",
        ["a big party", "meeting new people", "a lively crowd"],
        "quiet solitude",
        ["a quiet night in", "time alone", "a calm solo evening"]
    ),
    dim!(
        4,
        "Openness",
        "new experiences",
        ["something unusual", "fresh ideas", "an untried path"],
        "familiar routines",
        ["the usual way", "tried and true habits", "a known routine"]
    ),
    dim!(
        5,
        "Agreeableness",
        "kind cooperation",
        ["a friendly compromise", "warm teamwork", "gentle agreement"],
        "tough skepticism",
        ["a hard bargain", "cold doubt", "a firm pushback"]
    ),
    dim!(
        6,
        "Conscientiousness",
        "careful diligence",
        ["a detailed checklist", "steady hard work", "every deadline met"],
        "easygoing spontaneity",
        ["winging it", "a casual approach", "last minute fixes"]
    ),
    dim!(
        7,
        "Preference for food",
        "rich food",
        ["hearty meals", "a tasty feast", "bold flavors"],
        "light food",
        ["simple salads", "plain small meals", "a light snack"]
    ),
    dim!(
        8,
        "Preference for living environment",
        "city living",
        ["a downtown flat", "busy streets", "urban life"],
        "country living",
        ["a quiet village", "a farm house", "rural life"]
    ),
    dim!(
        9,
        "Preference for sleep",
        "early bedtimes",
        ["a full night's rest", "sleeping early", "a morning routine"],
        "late nights",
        ["staying up late", "a night owl schedule", "midnight hours"]
    ),
    dim!(
        10,
        "Preference for investment",
        "bold investing",
        ["risky stocks", "high return bets", "aggressive growth"],
        "safe investing",
        ["low risk bonds", "steady index funds", "cautious returns"]
    ),
    dim!(
        11,
        "Preference for saving",
        "careful saving",
        ["a rainy day fund", "cutting costs", "a tight budget"],
        "free spending",
        ["a shopping spree", "treating yourself", "splurging now"]
    ),
    dim!(
        12,
        "Importance of physical safety",
        "physical safety",
        ["safety gear", "a helmet first", "avoiding injury"],
        "physical risk",
        ["daring stunts", "extreme thrills", "a risky climb"]
    ),
    dim!(
        13,
        "Importance of environmental safety",
        "eco safety",
        ["green choices", "clean air", "less pollution"],
        "eco indifference",
        ["ignoring emissions", "disposable stuff", "plastic convenience"]
    ),
    dim!(
        14,
        "Depth of interaction",
        "deep conversations",
        ["a heart to heart", "meaningful talks", "long honest chats"],
        "light small talk",
        ["casual chit chat", "quick hellos", "surface banter"]
    ),
    dim!(
        15,
        "Conflict handling",
        "direct confrontation",
        ["facing it head on", "speaking up now", "an open argument"],
        "conflict avoidance",
        ["keeping the peace", "letting it slide", "staying out of it"]
    ),
    dim!(
        16,
        "Communication style (concise vs detailed)",
        "concise answers",
        ["a short reply", "the quick version", "brief points"],
        "detailed answers",
        ["a long explanation", "every little detail", "the full breakdown"]
    ),
    dim!(
        17,
        "Work environment",
        "team offices",
        ["a shared workspace", "open office life", "working with a team"],
        "remote work",
        ["working from home", "a home office", "solo remote days"]
    ),
    dim!(
        18,
        "Need for recognition",
        "public praise",
        ["a shout out", "getting credit", "a big award"],
        "quiet modesty",
        ["staying humble", "no spotlight", "credit to others"]
    ),
    dim!(
        19,
        "Need for personal achievement",
        "ambitious goals",
        ["a big promotion", "winning first place", "hitting milestones"],
        "relaxed ambitions",
        ["good enough results", "no pressure goals", "a slow pace"]
    ),
    dim!(
        20,
        "Knowledge area",
        "technical depth",
        ["hard numbers", "engineering facts", "formulas and data"],
        "humanities angle",
        ["history and ideas", "literary views", "a cultural lens"]
    ),
    dim!(
        21,
        "Learning style",
        "hands-on learning",
        ["learning by doing", "practice projects", "trial and error"],
        "theory first",
        ["reading the manual", "lectures and notes", "concepts before practice"]
    ),
    dim!(
        22,
        "Creative expression",
        "creative flair",
        ["an artistic twist", "a bold idea", "colorful imagination"],
        "practical plainness",
        ["the standard method", "no frills", "a plain solution"]
    ),
    dim!(
        23,
        "Order",
        "orderly plans",
        ["a neat schedule", "a tidy list", "step by step order"],
        "loose plans",
        ["a messy desk", "going with the flow", "no fixed schedule"]
    ),
    dim!(
        24,
        "Retention",
        "keeping things",
        ["a saved collection", "old keepsakes", "holding onto stuff"],
        "letting go",
        ["a big declutter", "tossing old stuff", "giving things away"]
    ),
    dim!(
        25,
        "Inviolacy",
        "guarded pride",
        ["defending my name", "protecting my honor", "self respect"],
        "thick skin",
        ["shrugging off insults", "laughing at myself", "no ego"]
    ),
    dim!(
        26,
        "Infavoidance",
        "avoiding embarrassment",
        ["saving face", "no awkward moments", "playing it safe"],
        "unafraid of failure",
        ["failing in public", "awkward first tries", "embracing mistakes"]
    ),
    dim!(
        27,
        "Counteraction",
        "bouncing back",
        ["trying again", "a comeback story", "never giving up"],
        "accepting defeat",
        ["moving on quietly", "dropping it", "calling it quits"]
    ),
    dim!(
        28,
        "Seclusion",
        "private space",
        ["a closed door", "keeping to myself", "personal space"],
        "open sharing",
        ["an open door", "sharing my life", "posting everything"]
    ),
    dim!(
        29,
        "Dominance",
        "taking charge",
        ["leading the group", "being the boss", "calling the shots"],
        "following along",
        ["letting others lead", "a back seat", "going with the group"]
    ),
    dim!(
        30,
        "Deference",
        "respecting experts",
        ["expert advice", "trusting elders", "following the rules"],
        "questioning authority",
        ["doubting the boss", "challenging rules", "my own judgment"]
    ),
    dim!(
        31,
        "Autonomy",
        "full independence",
        ["doing it my way", "relying on myself", "no one's permission"],
        "group guidance",
        ["asking for help", "shared decisions", "a team vote"]
    ),
    dim!(
        32,
        "Contrariance",
        "contrarian views",
        ["an unpopular opinion", "going against the crowd", "the opposite take"],
        "mainstream views",
        ["the popular choice", "common wisdom", "what most people do"]
    ),
    dim!(
        33,
        "Abasement",
        "self blame",
        ["owning my faults", "a humble apology", "taking the blame"],
        "self assurance",
        ["no apologies", "standing proud", "confident pride"]
    ),
    dim!(
        34,
        "Aggression",
        "fierce criticism",
        ["a harsh roast", "sharp words", "a heated rant"],
        "gentle restraint",
        ["soft words", "a kind tone", "cooling down"]
    ),
    dim!(
        35,
        "Affiliation",
        "close friendships",
        ["loyal friends", "a tight circle", "friend groups"],
        "loner life",
        ["going solo", "few friends", "doing things alone"]
    ),
    dim!(
        36,
        "Rejection",
        "picky choices",
        ["high standards", "cutting people off", "selective company"],
        "open acceptance",
        ["welcoming everyone", "giving second chances", "an open heart"]
    ),
    dim!(
        37,
        "Nurturance",
        "caring for others",
        ["helping a friend", "looking after someone", "a caring hand"],
        "self focus",
        ["me time", "my own needs first", "putting myself first"]
    ),
    dim!(
        38,
        "Succorance",
        "seeking support",
        ["a comforting shoulder", "asking for comfort", "someone to lean on"],
        "handling it alone",
        ["toughing it out", "no help needed", "solving it solo"]
    ),
    dim!(
        39,
        "Play",
        "playful fun",
        ["silly games", "goofing around", "a fun break"],
        "serious focus",
        ["all business", "no games", "staying serious"]
    ),
    dim!(
        40,
        "Concern for harmlessness",
        "safe content",
        ["a careful warning", "nothing harmful", "a safety note"],
        "edgy content",
        ["dark jokes", "risky advice", "no filters"]
    ),
    dim!(
        41,
        "Concern for instruction-following",
        "exact instructions",
        ["just what was asked", "the exact format", "following every rule"],
        "loose interpretation",
        ["a free spin", "bending the request", "creative liberties"]
    ),
    dim!(
        42,
        "Concern for honesty",
        "blunt honesty",
        ["the plain truth", "no sugar coating", "hard facts"],
        "tactful white lies",
        ["a gentle fib", "a kind lie", "sparing feelings"]
    ),
    dim!(
        43,
        "Concern for truthfulness",
        "verified facts",
        ["checked sources", "accurate details", "real evidence"],
        "loose claims",
        ["rough guesses", "hearsay", "unchecked rumors"]
    ),
    dim!(
        44,
        "Concern for helpfulness",
        "practical help",
        ["useful tips", "a working fix", "clear next steps"],
        "casual musing",
        ["idle thoughts", "a loose chat", "random musings"]
    ),
    dim!(
        45,
        "Concern for coherence",
        "clear structure",
        ["a logical flow", "tidy reasoning", "connected points"],
        "free flow",
        ["scattered thoughts", "a rambling style", "jumping around"]
    ),
    dim!(
        46,
        "Concern for complexity",
        "complex depth",
        ["advanced terms", "expert jargon", "nuanced layers"],
        "simple wording",
        ["plain words", "easy language", "a simple summary"]
    ),
    topic!(
        47,
        "Interest in science",
        "science topics",
        ["lab experiments", "space research", "physics facts"],
        "science"
    ),
    topic!(
        48,
        "Interest in knowledge",
        "general knowledge",
        ["trivia facts", "encyclopedia nuggets", "did you know facts"],
        "trivia"
    ),
    topic!(
        49,
        "Interest in psychology",
        "psychology insights",
        ["how the mind works", "mental habits", "behavior studies"],
        "psychology"
    ),
    topic!(
        50,
        "Interest in cinema",
        "movie talk",
        ["film reviews", "a classic film", "box office hits"],
        "movie",
        "movies"
    ),
    topic!(
        51,
        "Interest in entertainment",
        "entertainment news",
        ["tv shows", "variety specials", "streaming series"],
        "showbiz"
    ),
    topic!(52, "Interest in gaming", "video games", ["a new console", "gaming sessions", "online matches"], "gaming"),
    topic!(
        53,
        "Interest in parenting",
        "parenting advice",
        ["raising kids", "toddler tips", "family routines"],
        "parenting"
    ),
    topic!(
        54,
        "Interest in wild imagination",
        "wild imagination",
        ["dragons and magic", "far future worlds", "dream scenarios"],
        "fantasy"
    ),
    topic!(55, "Interest in anime", "anime series", ["manga art", "anime heroes", "japanese cartoons"], "anime"),
    topic!(56, "Interest in sports", "sports talk", ["the big game", "team scores", "match highlights"], "sports"),
    topic!(
        57,
        "Interest in law",
        "legal matters",
        ["court cases", "legal rights", "contract rules"],
        "legal",
        "the law"
    ),
    topic!(
        58,
        "Interest in workplace",
        "workplace topics",
        ["office politics", "career moves", "job interviews"],
        "office"
    ),
    topic!(59, "Interest in pets", "pet care", ["a cute puppy", "cat videos", "pet tricks"], "pet", "pets"),
    topic!(60, "Interest in travel", "travel plans", ["a road trip", "foreign cities", "beach resorts"], "travel"),
    topic!(61, "Interest in health", "health tips", ["a doctor's advice", "healthy habits", "vitamin facts"], "health"),
    topic!(
        62,
        "Interest in stories",
        "storytelling",
        ["a bedtime story", "short tales", "a good plot"],
        "story",
        "stories"
    ),
    topic!(63, "Interest in cars", "car culture", ["fast cars", "engine specs", "a new sedan"], "car", "cars"),
    topic!(
        64,
        "Interest in gourmet food",
        "gourmet cooking",
        ["fine dining", "chef recipes", "fancy restaurants"],
        "cooking"
    ),
    topic!(
        65,
        "Interest in education",
        "education topics",
        ["school lessons", "study methods", "teacher tips"],
        "school"
    ),
    topic!(
        66,
        "Interest in current events",
        "current events",
        ["breaking news", "today's headlines", "world updates"],
        "news"
    ),
    topic!(
        67,
        "Interest in home decor",
        "home decor",
        ["cozy interiors", "wall colors", "new furniture"],
        "decor",
        "home decor"
    ),
    topic!(
        68,
        "Interest in international",
        "global affairs",
        ["foreign policy", "other countries", "trade between nations"],
        "foreign affairs"
    ),
    topic!(
        69,
        "Interest in finance",
        "finance topics",
        ["market trends", "money management", "interest rates"],
        "money"
    ),
    topic!(
        70,
        "Interest in campus life",
        "campus life",
        ["dorm rooms", "college clubs", "student life"],
        "campus",
        "college life"
    ),
    topic!(
        71,
        "Interest in digital technology",
        "tech gadgets",
        ["new smartphones", "software updates", "smart devices"],
        "tech"
    ),
    topic!(
        72,
        "Interest in emotions",
        "emotional talk",
        ["sharing feelings", "mood swings", "inner emotions"],
        "feelings"
    ),
    topic!(73, "Interest in humor", "funny jokes", ["a funny joke", "witty puns", "a good laugh"], "humor"),
    topic!(74, "Interest in music", "music talk", ["a new album", "live concerts", "catchy songs"], "music"),
    topic!(75, "Interest in reading", "book talk", ["a good novel", "reading lists", "book clubs"], "book", "books"),
    topic!(
        76,
        "Interest in painting",
        "painting topics",
        ["oil paintings", "watercolor art", "brush strokes"],
        "painting"
    ),
    topic!(77, "Interest in dance", "dance topics", ["ballet moves", "dance classes", "hip hop steps"], "dance"),
    topic!(
        78,
        "Interest in crafts",
        "craft projects",
        ["knitting projects", "handmade gifts", "diy crafts"],
        "craft",
        "crafts"
    ),
    topic!(
        79,
        "Interest in photography",
        "photography tips",
        ["camera settings", "photo shoots", "sunset shots"],
        "photography"
    ),
    topic!(
        80,
        "Interest in culture",
        "cultural topics",
        ["local traditions", "old customs", "heritage festivals"],
        "culture"
    ),
    topic!(
        81,
        "Interest in fitness",
        "fitness routines",
        ["gym workouts", "a morning run", "strength training"],
        "fitness"
    ),
    topic!(82, "Interest in art", "art topics", ["art museums", "modern art", "famous artists"], "art"),
    topic!(
        83,
        "Interest in stationery and planners",
        "planner supplies",
        ["nice notebooks", "daily planners", "colored pens"],
        "planner",
        "planners"
    ),
    topic!(
        84,
        "Interest in celebrities",
        "celebrity news",
        ["star gossip", "famous faces", "red carpet looks"],
        "celebrity"
    ),
    topic!(
        85,
        "Interest in outdoors",
        "outdoor activities",
        ["a forest hike", "fresh air", "nature trails"],
        "outdoor",
        "the outdoors"
    ),
    topic!(86, "Interest in camping", "camping trips", ["a tent site", "campfire nights", "sleeping bags"], "camping"),
    topic!(
        87,
        "Interest in social sciences",
        "social science",
        ["economics theories", "sociology studies", "census trends"],
        "sociology"
    ),
    topic!(
        88,
        "Interest in weddings",
        "wedding topics",
        ["bridal gowns", "wedding venues", "a first dance"],
        "wedding"
    ),
    topic!(89, "Interest in fashion", "fashion trends", ["new outfits", "designer clothes", "street style"], "fashion"),
];

/// All 90 dimensions; `dims()[i].index == i`.
pub fn dims() -> &'static [Dim] {
    &DIMS
}

/// The pole of `dim` in direction `dir` (+1 → positive, anything else → negative).
///
/// Panics if `dim >= 90`.
pub fn pole(dim: usize, dir: i8) -> &'static Pole {
    let d = &DIMS[dim];
    if dir > 0 {
        &d.pos
    } else {
        &d.neg
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// AlignX's dimension names in order (shared/alignx-dimensions.tsv).
    const NAMES: [&str; 90] = [
        "Age group",
        "Gender",
        "Neuroticism",
        "Extraversion",
        "Openness",
        "Agreeableness",
        "Conscientiousness",
        "Preference for food",
        "Preference for living environment",
        "Preference for sleep",
        "Preference for investment",
        "Preference for saving",
        "Importance of physical safety",
        "Importance of environmental safety",
        "Depth of interaction",
        "Conflict handling",
        "Communication style (concise vs detailed)",
        "Work environment",
        "Need for recognition",
        "Need for personal achievement",
        "Knowledge area",
        "Learning style",
        "Creative expression",
        "Order",
        "Retention",
        "Inviolacy",
        "Infavoidance",
        "Counteraction",
        "Seclusion",
        "Dominance",
        "Deference",
        "Autonomy",
        "Contrariance",
        "Abasement",
        "Aggression",
        "Affiliation",
        "Rejection",
        "Nurturance",
        "Succorance",
        "Play",
        "Concern for harmlessness",
        "Concern for instruction-following",
        "Concern for honesty",
        "Concern for truthfulness",
        "Concern for helpfulness",
        "Concern for coherence",
        "Concern for complexity",
        "Interest in science",
        "Interest in knowledge",
        "Interest in psychology",
        "Interest in cinema",
        "Interest in entertainment",
        "Interest in gaming",
        "Interest in parenting",
        "Interest in wild imagination",
        "Interest in anime",
        "Interest in sports",
        "Interest in law",
        "Interest in workplace",
        "Interest in pets",
        "Interest in travel",
        "Interest in health",
        "Interest in stories",
        "Interest in cars",
        "Interest in gourmet food",
        "Interest in education",
        "Interest in current events",
        "Interest in home decor",
        "Interest in international",
        "Interest in finance",
        "Interest in campus life",
        "Interest in digital technology",
        "Interest in emotions",
        "Interest in humor",
        "Interest in music",
        "Interest in reading",
        "Interest in painting",
        "Interest in dance",
        "Interest in crafts",
        "Interest in photography",
        "Interest in culture",
        "Interest in fitness",
        "Interest in art",
        "Interest in stationery and planners",
        "Interest in celebrities",
        "Interest in outdoors",
        "Interest in camping",
        "Interest in social sciences",
        "Interest in weddings",
        "Interest in fashion",
    ];

    fn words(s: &str) -> usize {
        s.split_whitespace().count()
    }

    #[test]
    fn order_groups_and_indices() {
        let ds = dims();
        assert_eq!(ds.len(), 90);
        for (i, d) in ds.iter().enumerate() {
            assert_eq!(d.index, i);
            assert_eq!(d.name, NAMES[i], "dimension {i}");
            let want = if i >= 47 { "topic" } else { "trait" };
            assert_eq!(d.group, want, "dimension {i}");
        }
        assert_eq!(pole(16, 1).label, "concise answers");
        assert_eq!(pole(16, -1).label, "detailed answers");
        assert_eq!(pole(47, -1).label, "no science talk");
    }

    #[test]
    fn labels_and_phrases_are_unique_and_short() {
        let mut labels = HashSet::new();
        let mut all = HashSet::new();
        for d in dims() {
            for p in [&d.pos, &d.neg] {
                assert!((1..=4).contains(&words(p.label)), "label {:?}", p.label);
                assert!(labels.insert(p.label), "duplicate label {:?}", p.label);
                assert!(all.insert(p.label), "label {:?} reused", p.label);
                assert!(p.phrases.len() >= 3, "{:?} needs 3 phrases", p.label);
                for ph in p.phrases {
                    assert!((1..=4).contains(&words(ph)), "phrase {ph:?}");
                    assert_eq!(*ph, ph.to_lowercase(), "phrase {ph:?} not lower case");
                    assert!(all.insert(ph), "duplicate phrase {ph:?}");
                }
            }
        }
        assert_eq!(labels.len(), 180);
    }
}
