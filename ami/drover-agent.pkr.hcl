# Drover agent images (Amazon Linux 2023): `cpu` and `gpu`.
#   packer init ami/ && packer build -var agent_binary=target/release/drover-agent ami/
# The binary must run on AL2023 (glibc 2.34): build it there or for
# x86_64-unknown-linux-musl.

packer {
  required_plugins {
    amazon = {
      version = ">= 1.3.0"
      source  = "github.com/hashicorp/amazon"
    }
  }
}

variable "region" {
  type    = string
  default = "eu-west-1"
}

variable "agent_binary" {
  type        = string
  description = "Path to the drover-agent binary to bake in."
}

variable "version" {
  type    = string
  default = "dev"
}

variable "subnet_id" {
  type    = string
  default = ""
}

locals {
  stamp = formatdate("YYYYMMDDhhmmss", timestamp())
}

data "amazon-ami" "al2023" {
  region      = var.region
  owners      = ["amazon"]
  most_recent = true
  filters = {
    name                = "al2023-ami-2023.*-x86_64"
    architecture        = "x86_64"
    virtualization-type = "hvm"
  }
}

source "amazon-ebs" "cpu" {
  region        = var.region
  source_ami    = data.amazon-ami.al2023.id
  instance_type = "m6i.large"
  subnet_id     = var.subnet_id
  ssh_username  = "ec2-user"
  ami_name      = "drover-agent-cpu-${var.version}-${local.stamp}"
  imds_support  = "v2.0"
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "enabled"
  }
  launch_block_device_mappings {
    device_name           = "/dev/xvda"
    volume_size           = 30
    volume_type           = "gp3"
    delete_on_termination = true
  }
  tags = {
    Name             = "drover-agent-cpu"
    "drover:build"   = "cpu"
    "drover:version" = var.version
  }
}

source "amazon-ebs" "gpu" {
  region        = var.region
  source_ami    = data.amazon-ami.al2023.id
  instance_type = "g4dn.xlarge"
  subnet_id     = var.subnet_id
  ssh_username  = "ec2-user"
  ami_name      = "drover-agent-gpu-${var.version}-${local.stamp}"
  imds_support  = "v2.0"
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "enabled"
  }
  launch_block_device_mappings {
    device_name           = "/dev/xvda"
    volume_size           = 60
    volume_type           = "gp3"
    delete_on_termination = true
  }
  tags = {
    Name             = "drover-agent-gpu"
    "drover:build"   = "gpu"
    "drover:version" = var.version
  }
}

build {
  sources = ["source.amazon-ebs.cpu", "source.amazon-ebs.gpu"]

  provisioner "shell" {
    inline = ["mkdir -p /tmp/drover"]
  }

  provisioner "file" {
    sources = [
      var.agent_binary,
      "${path.root}/drover-agent.service",
      "${path.root}/drover-imds-block.service",
      "${path.root}/drover-fence.service",
      "${path.root}/drover-fence.timer",
      "${path.root}/docker-daemon.json",
      "${path.root}/journald-drover.conf",
      "${path.root}/logrotate-drover",
    ]
    destination = "/tmp/drover/"
  }

  provisioner "shell" {
    script           = "${path.root}/setup.sh"
    execute_command  = "sudo env {{ .Vars }} bash '{{ .Path }}'"
    environment_vars = ["DROVER_GPU=${source.name == "gpu" ? "1" : "0"}"]
  }

  # The driver's kernel module loads on the next boot: reboot, then prove it.
  provisioner "shell" {
    only              = ["amazon-ebs.gpu"]
    inline            = ["sudo reboot"]
    expect_disconnect = true
  }

  provisioner "shell" {
    only         = ["amazon-ebs.gpu"]
    pause_before = "30s"
    inline = [
      "nvidia-smi",
      "sudo docker run --rm --gpus all public.ecr.aws/amazonlinux/amazonlinux:2023 nvidia-smi -L",
    ]
  }

  provisioner "shell" {
    inline = ["systemctl is-enabled docker.service drover-imds-block.service drover-fence.timer", "/usr/local/bin/drover-agent --version"]
  }

  post-processor "manifest" {
    output = "${path.root}/manifest.json"
  }
}
