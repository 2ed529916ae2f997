"""LongBench's prompts and generation lengths, and their OPRM split into P, C and Q.

The texts in :data:`LONGBENCH_PROMPTS` and the lengths in :data:`LONGBENCH_MAX_NEW_TOKENS`
are LongBench's own (``LongBench/config/dataset2prompt.json`` and ``dataset2maxlen.json``
in THUDM/LongBench), reproduced character for character, typos included ("asconcisely"):
they are the benchmark's definition.

**The OPRM split.** Every LongBench prompt has exactly one ``{context}``: the text before
it is the instruction P (identical for every chunk, its state computed once), the text
after it, with ``{input}`` filled in, is Q. Vanilla inference uses the same P and Q
around the whole context, so both modes read the same words.

**The IDK instruction.** For OPRM, question-answering prompts also tell the model to
answer the IDK word when its chunk lacks the answer, so that the selector can drop those
chunks. The sentences and where they go follow the paper's reference code (Ben-Kish's
``OPRM/eval_longbench_oprm.py``): ``If the answer does not exist in the passages, return
"Error".`` before ``Question:`` for narrativeqa, multifieldqa_en, hotpotqa, 2wikimqa and
musique; qasper's own "unanswerable" becomes the IDK word (mapped back to
"unanswerable" before scoring, as the reference code notes); passage_retrieval_en gets
``If the abstract is not from any of the paragraphs, write "Error".``. The paper ran no
Chinese dataset; for multifieldqa_zh, dureader and passage_retrieval_zh we add the
Chinese equivalent in the same place (our choice). Summaries, few-shot, counting and
code prompts get none, as in the paper.

**Splits that are not clean.** trec, triviaqa, samsum and lsht put the few-shot examples
in ``{context}`` and the test item in ``{input}`` with no instruction after it: Q is just
the separator and the item. lcc has no ``{input}``: Q is ``Next line of code:\\n``.
repobench-p's ``{input}`` is the code right before the line to complete: it goes into Q.
For lcc under OPRM, the reference code does not select: it keeps only the last chunk of
the file (the lines just before the one to complete); the runner does the same.

**Summary mode.** gov_report, qmsum, multi_news and vcsum decode from every chunk and
join the parts in document order (the selector's ``summarize``), as the paper does for
its summary datasets.

**LongBench v2** uses its 0-shot prompt (``prompts/0shot.txt``): P is the text up to
``<text>``, Q the question, the four choices and the answer format; for OPRM the IDK
sentence goes before the answer format (our choice: the paper does not publish its v2
prompt).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import InputError

__all__ = [
    "LONGBENCH_PROMPTS", "LONGBENCH_MAX_NEW_TOKENS", "PAPER_MAX_NEW_TOKENS", "SUMMARY_DATASETS",
    "ENGLISH_DATASETS", "CHINESE_DATASETS", "PAPER_DATASETS", "IDK_INSTRUCTIONS", "PromptParts",
    "longbench_parts", "v2_parts", "V2_MAX_NEW_TOKENS", "max_new_tokens_for", "IDK_PLACEHOLDER",
]

#: LongBench's ``dataset2prompt.json``.
LONGBENCH_PROMPTS: dict[str, str] = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",  # noqa: E501
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",  # noqa: E501
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",  # noqa: E501
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",  # noqa: E501
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",  # noqa: E501
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",  # noqa: E501
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",  # noqa: E501
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",  # noqa: E501
    "passage_retrieval_zh": "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是：",  # noqa: E501
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

#: LongBench's ``dataset2maxlen.json``: the most tokens generated per answer.
LONGBENCH_MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}

#: The paper's reference code's ``dataset_ntoks`` (``--gen-lengths paper``); it covers the
#: 16 English datasets the paper ran.
PAPER_MAX_NEW_TOKENS: dict[str, int] = {
    "hotpotqa": 20, "2wikimqa": 20, "musique": 20, "narrativeqa": 20, "qasper": 20, "multifieldqa_en": 20,
    "gov_report": 500, "qmsum": 250, "multi_news": 250, "trec": 20, "triviaqa": 20, "samsum": 250,
    "passage_count": 20, "passage_retrieval_en": 20, "lcc": 40, "repobench-p": 40,
}

#: The 16 English datasets of the paper's LongBench table (its reference code's list).
PAPER_DATASETS: tuple[str, ...] = (
    "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report", "qmsum",
    "multi_news", "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p")
CHINESE_DATASETS: tuple[str, ...] = ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh")
ENGLISH_DATASETS: tuple[str, ...] = tuple(d for d in LONGBENCH_PROMPTS if d not in CHINESE_DATASETS)

#: Decoded from every chunk (OPRM's summary mode).
SUMMARY_DATASETS = frozenset({"gov_report", "qmsum", "multi_news", "vcsum"})

#: Where the IDK word stands in a filled sentence below.
IDK_PLACEHOLDER = "{idk}"

_EN_IDK = " If the answer does not exist in the passages, return \"{idk}\"."
_ZH_IDK = "如果文中没有答案，请回答\"{idk}\"。"

#: Per dataset: (the text in Q before which the IDK sentence goes, the sentence).
IDK_INSTRUCTIONS: dict[str, tuple[str, str]] = {
    "narrativeqa": ("\n\nQuestion:", _EN_IDK),
    "multifieldqa_en": ("\n\nQuestion:", _EN_IDK),
    "hotpotqa": ("\n\nQuestion:", _EN_IDK),
    "2wikimqa": ("\n\nQuestion:", _EN_IDK),
    "musique": ("\n\nQuestion:", _EN_IDK),
    "passage_retrieval_en": ("\n\nThe answer is:", " If the abstract is not from any of the paragraphs, write \"{idk}\"."),
    "multifieldqa_zh": ("\n\n问题：", _ZH_IDK),
    "dureader": ("\n\n问题：", _ZH_IDK),
    "passage_retrieval_zh": ("\n\n答案是：", "如果摘要不出自任何段落，请回答\"{idk}\"。"),
}

#: qasper says "unanswerable" where the others would say the IDK word.
_QASPER_UNANSWERABLE = "unanswerable"


@dataclass(frozen=True)
class PromptParts:
    """One example's model input, split as OPRM needs it.

    ``instruction`` (P) precedes the context, ``question`` (Q, filled) follows it;
    ``summary`` asks for summary mode under OPRM; ``idk_means`` is the text an answer
    that is exactly the IDK word stands for in this dataset's scoring (qasper:
    "unanswerable"), or None.
    """

    instruction: str
    context: str
    question: str
    summary: bool = False
    idk_means: str | None = None

    def text(self) -> str:
        """The whole prompt as one string (what vanilla inference reads)."""
        return self.instruction + self.context + self.question


def _split(template: str, dataset: str) -> tuple[str, str]:
    if template.count("{context}") != 1:
        raise InputError(f"{dataset}: a prompt needs exactly one {{context}}")
    before, after = template.split("{context}")
    return before, after


def longbench_parts(dataset: str, example: Mapping[str, Any], *, oprm: bool, idk_word: str = "Error",
                    idk_instruction: bool = True) -> PromptParts:
    """P, C and Q for one LongBench example (``context`` and ``input`` fields).

    ``oprm`` adds the IDK instruction where the dataset has one (``idk_instruction``
    False leaves it out, for models run without the IDK filter).
    """
    if dataset not in LONGBENCH_PROMPTS:
        raise InputError(f"unknown LongBench dataset {dataset!r}; known: {', '.join(LONGBENCH_PROMPTS)}")
    before, after = _split(LONGBENCH_PROMPTS[dataset], dataset)
    idk_means = None
    if oprm and idk_instruction:
        if dataset == "qasper":
            before = before.replace(f'"{_QASPER_UNANSWERABLE}"', f'"{idk_word}"')
            after = after.replace(f'"{_QASPER_UNANSWERABLE}"', f'"{idk_word}"')
            idk_means = _QASPER_UNANSWERABLE
        elif dataset in IDK_INSTRUCTIONS:
            anchor, sentence = IDK_INSTRUCTIONS[dataset]
            if anchor not in after:  # a prompt edited without the anchor: fail, never drop the instruction silently
                raise InputError(f"{dataset}: cannot place the IDK instruction (no {anchor!r} in the prompt)")
            at = after.index(anchor)
            after = after[:at] + sentence.replace(IDK_PLACEHOLDER, idk_word) + after[at:]
    question = after.replace("{input}", str(example.get("input") or ""))
    return PromptParts(before, str(example.get("context") or ""), question, summary=dataset in SUMMARY_DATASETS,
                       idk_means=idk_means)


# ---------------------------------------------------------------------- LongBench v2
#: LongBench v2's ``prompts/0shot.txt`` cut at ``$DOC$``.
_V2_BEFORE = "Please read the following text and answer the question below.\n\n<text>\n"
_V2_AFTER = ("\n</text>\n\nWhat is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n"
             "(C) $C_C$\n(D) $C_D$\n\nFormat your response as follows: \"The correct answer is (insert answer here)\".")
_V2_IDK_ANCHOR = "\n\nFormat your response"
_V2_IDK = " If the text does not contain the information needed to answer, answer \"{idk}\"."

#: LongBench v2's ``max_new_tokens`` without chain-of-thought (``pred.py``).
V2_MAX_NEW_TOKENS = 128


def v2_parts(example: Mapping[str, Any], *, oprm: bool, idk_word: str = "Error",
             idk_instruction: bool = True) -> PromptParts:
    """P, C and Q for one LongBench v2 example (its fields stripped, as ``pred.py`` does)."""
    after = _V2_AFTER
    if oprm and idk_instruction:
        at = after.index(_V2_IDK_ANCHOR)
        after = after[:at] + _V2_IDK.replace(IDK_PLACEHOLDER, idk_word) + after[at:]
    # One pass over the placeholders, so a "$C_A$" inside the question text stays as written.
    values = {"$Q$": example["question"], "$C_A$": example["choice_A"], "$C_B$": example["choice_B"],
              "$C_C$": example["choice_C"], "$C_D$": example["choice_D"]}
    after = re.sub(r"\$(Q|C_[ABCD])\$", lambda m: str(values[m.group(0)]).strip(), after)
    return PromptParts(_V2_BEFORE, str(example["context"]).strip(), after)


def max_new_tokens_for(dataset: str, lengths: str = "longbench", override: int | None = None) -> int:
    """Tokens to generate: ``override`` if given, else LongBench's or the paper's length."""
    if override is not None:
        return int(override)
    if lengths == "paper" and dataset in PAPER_MAX_NEW_TOKENS:
        return PAPER_MAX_NEW_TOKENS[dataset]
    if dataset == "longbench_v2":
        return V2_MAX_NEW_TOKENS
    return LONGBENCH_MAX_NEW_TOKENS.get(dataset, 64)
