"""Document functions of the tiny offline tasks the eval tests run."""


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def doc_to_target(doc):
    return doc["answer"]


def doc_to_choice(doc):
    return list(doc["choices"])


def doc_to_mc_target(doc):
    return int(doc["label"])


def process_results(doc, results):
    prediction = results[0].strip()
    return {"exact_match": float(prediction == doc["answer"].strip())}
