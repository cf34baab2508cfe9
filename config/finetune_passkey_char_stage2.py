# Stage 2 of the passkey recipe: 1,000 more steps on the same data, from a stage-1 run (config/finetune_passkey_char.py).
# Give both files, in this order, so that everything else stays stage 1's:
#   python train.py config/finetune_passkey_char.py config/finetune_passkey_char_stage2.py \
#       --init_from=out-passkey-char-lssar-s1 --finetune_reweight_p=15 --out_dir=out-passkey-char-lssar
# LSSAR switches its re-weighting on here (--finetune_reweight_p=15): stage 1 taught it the copy with p = 0, since
# with p = 15 from the start the key letter's weight is ~1e-15 and nothing learns to find it. Softmax and LSSA run the
# same stage with p unchanged, so every model gets the same 3,500 fine-tuning steps.
max_iters = 1000
lr_decay_iters = 1000
eval_interval = 250
