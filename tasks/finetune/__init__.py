"""The finetune stage: conversations -> ``data/sft`` -> the base model fine-tuned into a chat
model, through the train stage's launcher."""
