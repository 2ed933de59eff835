"""Early-learning regularisation of the prompt decoder (Liu et al., "Early-Learning
Regularization Prevents Memorization of Noisy Labels", NeurIPS 2020).

A decoder trained on a few thousand images learns each training prompt by heart, what no
image shows included (on the generated data: which of two wordings the prompt took, at
random); on a new image that choice then follows whichever training images it resembles.
Networks fit what their examples share first and memorise the rest later, so each training
prompt keeps a running average of the distributions the decoder predicted at its positions,
t ← m·t + (1 − m)·p, and the loss adds weight · log(1 − ⟨t, p⟩), which pulls each prediction
toward that average: tokens the images determine are learnt as before, the others stay
near what the images share (docs/decoder.md: "The training images learnt by heart").
"""

import torch

from img2prompt import distributed

MOMENTUM = 0.7  # the paper's


class EarlyLearning:
    """The running averages of the training prompts' predicted distributions (float16:
    prompts x positions x vocabulary, in the computer's memory: a batch's rows go to the
    training device and back) and the regulariser."""

    def __init__(self, sequences, vocabulary, weight, momentum=MOMENTUM):
        positions = max(len(s) for s in sequences) - 1
        self.averages = torch.zeros((len(sequences), positions, vocabulary), dtype=torch.float16)
        self.seen = torch.zeros(len(sequences), dtype=torch.bool)
        self.weight, self.momentum = weight, momentum

    def penalty(self, logits, rows):
        """The regulariser at every position of ``logits`` ([prompts, positions, vocabulary],
        of the training prompts ``rows``; the caller leaves the padding out), after their
        averages took these predictions in."""
        predicted = logits.float().softmax(dim=-1)
        rows, width = torch.as_tensor(rows), logits.shape[1]
        earlier = self.averages[rows, :width].to(logits.device).float()
        seen = self.seen[rows].view(-1, 1, 1).to(logits.device)
        average = torch.where(seen, self.momentum * earlier + (1 - self.momentum) * predicted.detach(),
                              predicted.detach())
        self.averages[rows, :width] = average.to("cpu", self.averages.dtype)
        self.seen[rows] = True
        agreement = (average * predicted).sum(dim=-1).clamp(max=1 - 1e-4)
        return self.weight * torch.log1p(-agreement)

    def share(self, batch, mine, device):
        """Under torchrun: every process takes in the averages the others updated for the
        prompts of ``batch`` (``mine``: this process's share of it), so that whichever process
        meets a prompt next epoch starts from its average. (The collective runs on the
        training ``device``.)"""
        if distributed.world_size() == 1:
            return
        block = torch.zeros((len(batch), *self.averages.shape[1:]), device=device)
        if mine:
            block[distributed.share(list(range(len(batch))))] = self.averages[mine].to(device).float()
        distributed.sum_over_processes(block)
        self.averages[batch] = block.to("cpu", self.averages.dtype)
        self.seen[batch] = True

    def state_dict(self) -> dict:
        return {"averages": self.averages, "seen": self.seen}

    def load_state_dict(self, state):
        self.averages.copy_(state["averages"])
        self.seen.copy_(state["seen"])
