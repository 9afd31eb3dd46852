"""The post-processing configuration Florence-2 processors carry (public facts of the format)."""

# Phrases Microsoft's grounding parser refuses to ground (pronouns, determiners, "the image").
# fmt: off
BANNED_GROUNDING_PHRASES = sorted({
    "it", "I", "me", "mine", "you", "your", "yours", "he", "him", "his", "she", "her", "hers", "they",
    "them", "their", "theirs", "one", "oneself", "we", "us", "our", "ours", "its", "myself", "yourself",
    "himself", "herself", "itself", "ourselves", "yourselves", "themselves", "this", "that", "these",
    "those", "who", "whom", "whose", "which", "what", "all", "another", "any", "anybody", "anyone",
    "anything", "each", "everybody", "everyone", "everything", "few", "many", "nobody", "none",
    "several", "some", "somebody", "someone", "something", "image", "images", "the", "a", "an", "lots",
    "each other", "one another", "the image", "a group", "other objects", "a set",
})
# fmt: on

OCR_PATTERN = r"(.+?)" + r"<loc_(\d+)>" * 8


def post_processor_config() -> dict:
    """The ``post_processor_config`` a Florence2Processor needs to parse every task."""
    return {
        "ocr": {"pattern": OCR_PATTERN, "area_threshold": 0.0},
        "phrase_grounding": {"banned_grounding_tokens": BANNED_GROUNDING_PHRASES},
        "pure_text": {},
        "description_with_bboxes": {},
        "description_with_polygons": {},
        "polygons": {},
        "bboxes": {},
        "description_with_bboxes_or_polygons": {},
    }
